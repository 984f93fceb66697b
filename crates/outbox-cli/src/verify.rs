//! `outbox verify`: the audit of the broker against the table.

use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use outbox_core::{AuditPolicy, AuditReport, LostReason};
use outbox_postgres::CreatedWindow;
use outbox_relay::{Mode, RelayConfig, RelayError};

use crate::database::privilege_is_config;

/// `outbox verify` found lost or out-of-order events.
const AUDIT_FAILED: u8 = 4;

/// `outbox verify`: the rows of the window from the table, then their topics read up to
/// their current ends (rows first, so every row marked published before the read is
/// below the ends), then the comparison.
pub(crate) async fn verify(
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
