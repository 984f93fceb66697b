//! RESULTS.md: the tables a reader compares the systems by.

use std::fmt::Write;

use crate::report::{mean, Limits, Report, Session, Step, Verdict};

type Figure = Box<dyn Fn(&Session) -> Option<f64>>;

pub fn markdown(report: &Report) -> String {
    let plan = &report.plan;
    let m = &report.machine;
    let systems = report.by_system();
    let first = plan.steps[0];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmark: outbox against Debezium's outbox router\n"
    );
    let _ = writeln!(
        out,
        "Run of {}, profile `{}`: `{}`.\n\n\
         Machine: {} cores ({}), {} GiB, Linux {}. PostgreSQL 15, a single-node Kafka 4.1.1 \
         broker, the writers, the consumer and the system under test all share it, on \
         loopback.\n\n\
         Load: {} B JSON events, {} writer connections, open loop (the writers keep to their \
         schedule whatever the system does), one event per transaction up to {} transactions/s \
         and several per transaction above. Steps of {} s at {} events/s; a step is kept up \
         with when its last event is consumed at most {} s after the writers' last commit. \
         {} probe(s) of {} s bisect between the last step kept up with and the first one \
         fallen behind. Backlog: the system is paused (SIGSTOP), {} events are written, it is \
         resumed and the drain is timed. {} round(s), the systems alternating within each \
         round. Latency is the writer's COMMIT returning → the consumer receiving the message. \
         CPU and memory come from /proc: the system's process (Kafka Connect's JVM for \
         Debezium), and all PostgreSQL processes (those that exited within a step included), \
         also less the writers' own backends.{}\n",
        report.started_at,
        plan.profile,
        report.command,
        m.cores,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        plan.payload_bytes,
        plan.writers,
        plan.max_tx_per_sec,
        plan.step_seconds,
        join(&plan.steps),
        plan.max_lag_seconds,
        plan.probes,
        plan.probe_seconds,
        plan.backlog_events,
        plan.rounds,
        match plan.database_rtt_ms {
            0 => String::new(),
            rtt => format!(
                " The systems reach PostgreSQL through a Toxiproxy that adds {rtt} ms to every \
                 round trip (a database on another host); the writers and the consumer connect \
                 directly."
            ),
        },
    );

    // Summary.
    let figures: Vec<(String, Figure)> = vec![
        (
            "highest rate kept up with (events/s) ↑".into(),
            Box::new(|s: &Session| Some(s.max_sustained.events_per_sec)),
        ),
        (
            "backlog drain (events/s) ↑".into(),
            Box::new(|s: &Session| Some(s.backlog.events_per_sec)),
        ),
        (
            format!("latency p50 at {first}/s (ms) ↓"),
            Box::new(move |s: &Session| s.step(first).map(|x| x.p50_ms)),
        ),
        (
            format!("latency p99 at {first}/s (ms) ↓"),
            Box::new(move |s: &Session| s.step(first).map(|x| x.p99_ms)),
        ),
        (
            format!("latency p99.9 at {first}/s (ms) ↓"),
            Box::new(move |s: &Session| s.step(first).map(|x| x.p999_ms)),
        ),
        (
            format!("CPU-seconds per million events at {first}/s ↓"),
            Box::new(move |s: &Session| s.step(first).map(|x| x.cpu_seconds_per_million)),
        ),
        (
            "CPU-seconds per million events, backlog drain ↓".into(),
            Box::new(|s: &Session| Some(s.backlog.cpu_seconds_per_million)),
        ),
        (
            format!("PostgreSQL CPU-seconds per million events at {first}/s ↓"),
            Box::new(move |s: &Session| s.step(first).map(|x| x.postgres_cpu_seconds_per_million)),
        ),
        (
            format!("PostgreSQL CPU-seconds per million events at {first}/s, less the writers' backends ↓"),
            Box::new(move |s: &Session| {
                s.step(first)
                    .and_then(|x| x.postgres_cpu_less_writers_seconds_per_million)
            }),
        ),
        (
            "peak RSS (MiB) ↓".into(),
            Box::new(|s: &Session| Some(s.peak_rss_mib)),
        ),
        (
            "idle CPU (% of a core) ↓".into(),
            Box::new(|s: &Session| Some(s.idle.cpu_percent)),
        ),
        (
            "PostgreSQL CPU while idle (% of a core) ↓".into(),
            Box::new(|s: &Session| Some(s.idle.postgres_cpu_percent)),
        ),
        (
            "start-up to first event consumed (s) ↓".into(),
            Box::new(|s: &Session| Some(s.startup_seconds)),
        ),
    ];
    let ours: Vec<&str> = ["polling", "cdc"]
        .into_iter()
        .filter(|s| systems.iter().any(|(n, _)| n == s))
        .collect();
    let peers: Vec<&str> = ["debezium", "debezium-tuned"]
        .into_iter()
        .filter(|s| systems.iter().any(|(n, _)| n == s))
        .collect();
    let pairs: Vec<(&str, &str)> = ours
        .iter()
        .flat_map(|o| peers.iter().map(move |p| (*o, *p)))
        .collect();
    let _ = writeln!(
        out,
        "## Summary (mean of {} round(s); ↑ higher is better, ↓ lower is better)\n",
        // The rounds that ran: an interrupted run has fewer than its plan.
        report.sessions.iter().map(|s| s.round).max().unwrap_or(0)
    );
    out.push_str("| figure |");
    for (name, _) in &systems {
        let _ = write!(out, " {name} |");
    }
    for (o, p) in &pairs {
        let _ = write!(out, " {o} ÷ {p} |");
    }
    out.push_str("\n| --- |");
    for _ in 0..systems.len() + pairs.len() {
        out.push_str(" ---: |");
    }
    out.push('\n');
    for (name, figure) in &figures {
        let _ = write!(out, "| {name} |");
        let value = |system: &str| {
            systems
                .iter()
                .find(|(n, _)| *n == system)
                .map(|(_, s)| mean(s, figure))
                .unwrap_or(f64::NAN)
        };
        for (system, _) in &systems {
            let _ = write!(out, " {} |", number(value(system)));
        }
        for (o, p) in &pairs {
            let _ = write!(out, " {} |", ratio(value(o), value(p)));
        }
        out.push('\n');
    }
    out.push_str("\nWhat capped the highest rate kept up with (last round):\n\n");
    for (name, sessions) in &systems {
        if let Some(last) = sessions.last() {
            let _ = writeln!(out, "- {name}: {}", last.max_sustained.limited_by);
        }
    }

    if !report.limits.is_empty() {
        limits_section(&mut out, report);
    }
    large_events_section(&mut out, report);
    big_table_section(&mut out, report);

    // Latency per step.
    let _ = writeln!(
        out,
        "\n## Latency per step (ms, p50 / p99 / p99.9, mean of the rounds that ran the step)\n"
    );
    step_table(&mut out, report, |steps| {
        format!(
            "{} / {} / {}",
            number(avg(steps, |s| s.p50_ms)),
            number(avg(steps, |s| s.p99_ms)),
            number(avg(steps, |s| s.p999_ms))
        )
    });
    let _ = writeln!(
        out,
        "\n## CPU per step (CPU-seconds per million events: the system / all of PostgreSQL / PostgreSQL less the writers' backends)\n"
    );
    step_table(&mut out, report, |steps| {
        format!(
            "{} / {} / {}",
            number(avg(steps, |s| s.cpu_seconds_per_million)),
            number(avg(steps, |s| s.postgres_cpu_seconds_per_million)),
            number(avg(steps, |s| s
                .postgres_cpu_less_writers_seconds_per_million
                .unwrap_or(f64::NAN)))
        )
    });
    let _ = writeln!(
        out,
        "\n## Writers' achieved rate and end lag per step (events/s, s)\n"
    );
    step_table(&mut out, report, |steps| {
        format!(
            "{} / {}",
            number(avg(steps, |s| s.achieved_rate)),
            number(avg(steps, |s| s.end_lag_seconds))
        )
    });

    // Rounds.
    let _ = writeln!(
        out,
        "\n## Every session, in the order they ran (drift shows as a difference between rounds)\n"
    );
    let _ = writeln!(
        out,
        "| system | round | highest kept up (events/s) | saturation probes (events/s: verdict) | backlog (events/s) | p99 at {first}/s (ms) | idle CPU (%) | peak RSS (MiB) | duplicates |"
    );
    out.push_str("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n");
    for s in &report.sessions {
        let probes: Vec<String> = s
            .probes
            .iter()
            .map(|p| format!("{}: {}", p.target_rate, verdict(p.verdict)))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.system,
            s.round,
            number(s.max_sustained.events_per_sec),
            if probes.is_empty() {
                "—".into()
            } else {
                probes.join(", ")
            },
            number(s.backlog.events_per_sec),
            number(s.step(first).map(|x| x.p99_ms).unwrap_or(f64::NAN)),
            number(s.idle.cpu_percent),
            number(s.peak_rss_mib),
            s.duplicates,
        );
    }
    out.push_str(
        "\n## Plots\n\n\
         ![Throughput](plots/throughput.png)\n\n\
         ![Latency per step](plots/latency.png)\n\n\
         ![Memory and CPU](plots/resources.png)\n",
    );
    out
}

/// A table with one row per target rate and one column per system.
fn step_table(out: &mut String, report: &Report, cell: impl Fn(&[&Step]) -> String) {
    let systems = report.by_system();
    out.push_str("| target (events/s) |");
    for (name, _) in &systems {
        let _ = write!(out, " {name} |");
    }
    out.push_str("\n| ---: |");
    for _ in &systems {
        out.push_str(" --- |");
    }
    out.push('\n');
    for &rate in &report.plan.steps {
        let _ = write!(out, "| {rate} |");
        for (_, sessions) in &systems {
            let steps: Vec<&Step> = sessions.iter().filter_map(|s| s.step(rate)).collect();
            if steps.is_empty() {
                out.push_str(" not run (an earlier step was not kept up with) |");
                continue;
            }
            let mut text = cell(&steps);
            for v in [Verdict::FellBehind, Verdict::WritersShort] {
                let n = steps.iter().filter(|s| s.verdict == v).count();
                if n > 0 {
                    let _ = write!(
                        text,
                        " ({}{})",
                        verdict(v),
                        if steps.len() > 1 {
                            format!(" in {n} of {}", steps.len())
                        } else {
                            String::new()
                        }
                    );
                }
            }
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
}

fn verdict(v: Verdict) -> &'static str {
    match v {
        Verdict::Sustained => "kept up",
        Verdict::WritersShort => "writers short",
        Verdict::FellBehind => "fell behind",
    }
}

fn avg(steps: &[&Step], f: impl Fn(&Step) -> f64) -> f64 {
    steps.iter().map(|s| f(s)).sum::<f64>() / steps.len() as f64
}

fn join(steps: &[u32]) -> String {
    steps
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Three significant figures, thousands unseparated (tables stay narrow).
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        "—".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(ours: f64, peer: f64) -> String {
    if ours.is_finite() && peer.is_finite() && peer != 0.0 {
        format!("{}×", number(ours / peer))
    } else {
        "—".into()
    }
}

/// The limits of the machine, and each system's figures as a share of them.
fn limits_section(out: &mut String, report: &Report) {
    let plan = &report.plan;
    let systems = report.by_system();
    let kafka = |tx: bool, f: fn(&crate::report::KafkaAlone) -> f64| {
        report.limit(move |l| l.kafka(tx).map(f))
    };
    let _ = writeln!(
        out,
        "\n## The machine's limits (measured at the start of each round; mean of {} round(s))\n\n\
         - **Kafka alone**: the relay's own producer (its Kafka sink, settings and batch size \
         of {}) sends the same messages with no database. Latency is from handing a message \
         to the producer to the consumer receiving it; the drain publishes the backlog's \
         {} messages batch after batch.\n\
         - **PostgreSQL alone**: the writers' commit rate, closed loop, with no system \
         running.\n\
         - **Replication stream alone**: the backlog's {} events written to a table with a \
         slot, then decoded by PostgreSQL (`pgoutput`, the options our relay sends) and read \
         by `pg_recvlogical` to the WAL position after the last commit, with nothing behind \
         it.\n",
        report.limits.len(),
        report
            .limits
            .first()
            .and_then(|l| l.kafka.first())
            .map(|k| k.batch_size)
            .unwrap_or(0),
        plan.backlog_events,
        plan.backlog_events,
    );
    out.push_str("| limit | events/s |\n| --- | ---: |\n");
    for tx in [true, false] {
        let _ = writeln!(
            out,
            "| Kafka alone, transactions {}: drain | {} |",
            if tx {
                "on (the relay's default)"
            } else {
                "off"
            },
            number(kafka(tx, |k| k.drain_events_per_sec))
        );
    }
    let mut shapes: Vec<usize> = report
        .limits
        .iter()
        .flat_map(|l| l.postgres.writers.iter().map(|w| w.events_per_tx))
        .collect();
    shapes.sort_unstable();
    shapes.dedup();
    for per_tx in &shapes {
        let _ = writeln!(
            out,
            "| PostgreSQL alone: writers, {per_tx} event(s) per transaction | {} |",
            number(report.limit(|l| {
                l.postgres
                    .writers
                    .iter()
                    .find(|w| w.events_per_tx == *per_tx)
                    .map(|w| w.events_per_sec)
            }))
        );
    }
    let _ = writeln!(
        out,
        "| replication stream alone (`pg_recvlogical`) | {} |",
        number(report.limit(|l| Some(l.stream.events_per_sec)))
    );

    let _ = writeln!(
        out,
        "\nLatency floor, Kafka alone (ms, p50 / p99 / p99.9):\n\n\
         | target (events/s) | transactions on | transactions off |\n| ---: | --- | --- |"
    );
    for &rate in &plan.steps {
        let cell = |tx: bool| {
            let q = |f: fn(&crate::report::KafkaStep) -> f64| {
                report.limit(move |l| l.kafka(tx).and_then(|k| k.step(rate)).map(f))
            };
            format!(
                "{} / {} / {}",
                number(q(|s| s.p50_ms)),
                number(q(|s| s.p99_ms)),
                number(q(|s| s.p999_ms))
            )
        };
        let _ = writeln!(out, "| {rate} | {} | {} |", cell(true), cell(false));
    }

    // Each system against the limit that bounds it.
    let first = plan.steps[0];
    let _ = writeln!(
        out,
        "\nEach system against the limits (percent of the limit; latency as a multiple of \
         Kafka alone's with transactions):\n\n\
         | system | backlog drain ÷ Kafka alone | backlog drain ÷ stream alone | highest rate kept \
         up ÷ writers alone (same events per transaction) | p50 at {first}/s ÷ Kafka alone's \
         |\n| --- | ---: | ---: | ---: | ---: |"
    );
    for (name, sessions) in &systems {
        let drain = mean(sessions, |s| Some(s.backlog.events_per_sec));
        let kept_up = mean(sessions, |s| {
            let best = s.best_kept_up()?;
            let ceiling = limits_of(report, s.round)?.writers_at(best.events_per_tx)?;
            Some(best.achieved_rate / ceiling * 100.0)
        });
        let p50 = mean(sessions, |s| {
            let floor = limits_of(report, s.round)?.kafka(true)?.step(first)?.p50_ms;
            Some(s.step(first)?.p50_ms / floor)
        });
        let reads_the_stream = *name != "polling";
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} |",
            percent(drain / kafka(true, |k| k.drain_events_per_sec)),
            if reads_the_stream {
                percent(drain / report.limit(|l| Some(l.stream.events_per_sec)))
            } else {
                "—".into()
            },
            percent(kept_up / 100.0),
            if p50.is_finite() {
                format!("{}×", number(p50))
            } else {
                "—".into()
            },
        );
    }
}

/// The limits measured at the start of a round.
fn limits_of(report: &Report, round: usize) -> Option<&Limits> {
    report.limits.iter().find(|l| l.round == round)
}

fn percent(fraction: f64) -> String {
    if fraction.is_finite() {
        format!("{}%", number(fraction * 100.0))
    } else {
        "—".into()
    }
}

/// Our relay's drain of a backlog of large events, and its memory meanwhile.
fn large_events_section(out: &mut String, report: &Report) {
    let sessions: Vec<&Session> = report
        .sessions
        .iter()
        .filter(|s| s.large_backlog.is_some())
        .collect();
    let Some(first) = sessions.first().and_then(|s| s.large_backlog.as_ref()) else {
        return;
    };
    let _ = writeln!(
        out,
        "\n## Large events (our relay only)\n\n\
         The system paused, {} MiB of events of {} KiB (random hex in a JSON string) \
         written 10 per transaction in plain SQL, the system resumed: the drain, and the \
         highest resident memory sampled meanwhile (every 50 ms). Debezium is not run \
         here.\n\n\
         | system | round | events | drain (MiB/s) | drain (events/s) | peak RSS while draining (MiB) |\n\
         | --- | ---: | ---: | ---: | ---: | ---: |",
        report.plan.large_backlog_mib,
        first.event_bytes / 1024,
    );
    for s in sessions {
        let large = s.large_backlog.as_ref().expect("filtered");
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            s.system,
            s.round,
            large.events,
            number(large.mib_per_sec),
            number(large.events_per_sec),
            number(large.peak_rss_mib),
        );
    }
}

/// Polling with millions of retained rows against the same session's fresh table, and
/// during the purge of rows past the retention.
fn big_table_section(out: &mut String, report: &Report) {
    let sessions: Vec<&Session> = report
        .sessions
        .iter()
        .filter(|s| s.big_table.is_some())
        .collect();
    if sessions.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n## A big table (polling)\n\n\
         After its other phases, the table of a polling session gets {} published rows \
         (1 KiB payloads, published within the last day, written in plain SQL, then \
         `VACUUM (ANALYZE)` and `CHECKPOINT`), and the session's highest step up to 10k events/s and its \
         backlog drain run again. Then a fifth as many rows published 30 days ago are \
         added, and once the relay's purge (every minute, 1,000 rows per statement) has \
         begun on them, the step runs a third time. Compared with the same session's \
         fresh table (its own rows only).\n\n\
         | round | rate (events/s) | p50 / p99 fresh (ms) | p50 / p99 big (ms) | p50 / p99 during the purge (ms) | rows purged during that step | drain fresh → big (events/s) | big ÷ fresh: p99, drain |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        number(report.plan.big_table_rows as f64),
    );
    for s in sessions {
        let big = s.big_table.as_ref().expect("filtered");
        let rate = big.step.target_rate;
        let fresh = s.step(rate);
        let pair = |step: Option<&Step>| match step {
            Some(x) => format!("{} / {}", number(x.p50_ms), number(x.p99_ms)),
            None => "—".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {}{} | {} → {} | {}, {} |",
            s.round,
            rate,
            pair(fresh),
            pair(Some(&big.step)),
            pair(Some(&big.purge_step)),
            number(big.purged_during_step as f64),
            if big.purge_rows_left_after_step == 0 {
                " (the purge ended during the step)"
            } else {
                ""
            },
            number(s.backlog.events_per_sec),
            number(big.backlog.events_per_sec),
            fresh
                .map(|f| format!("{:.2}×", big.step.p99_ms / f.p99_ms))
                .unwrap_or_else(|| "—".into()),
            format_args!(
                "{:.2}×",
                big.backlog.events_per_sec / s.backlog.events_per_sec
            ),
        );
    }
}
