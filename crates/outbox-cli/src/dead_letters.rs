//! `outbox dead-letters list|retry|skip`.

use outbox_core::DeadLetterPolicy;
use outbox_relay::{RelayConfig, RelayError};
use uuid::Uuid;

use crate::database::{open_read_only_store, open_store};

pub(crate) async fn list(config: &RelayConfig, limit: i64, json: bool) -> Result<(), RelayError> {
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
                    "skipped_at": d.skipped_at.map(|at| at.to_rfc3339()),
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
        let state = match d.skipped_at {
            Some(at) => format!("skipped at {}", at.to_rfc3339()),
            None if config.on_dead_letter == DeadLetterPolicy::Park => {
                "parks its aggregate".to_string()
            }
            None => "skipped by policy".to_string(),
        };
        println!(
            "{}  {}/{}  {}  attempts={}  at {}  {state}\n    {}",
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
        "{} dead letter(s); `outbox dead-letters retry ID...` (or `--all`) queues them again, `outbox dead-letters skip ID...` lets their aggregates go on without them",
        letters.len()
    );
    Ok(())
}

pub(crate) async fn skip(config: &RelayConfig, ids: Option<Vec<Uuid>>) -> Result<(), RelayError> {
    let (mut conn, store) = open_store(config).await?;
    let skipped = store.skip_dead_letters(&mut conn, ids.as_deref()).await?;
    println!(
        "skipped {} dead letter(s); the later events of their aggregates go on",
        skipped.len()
    );
    not_dead_letters(config, ids, &skipped, "or dead letters skipped already")
}

/// The ids of `asked` that `done` does not hold, as an error.
fn not_dead_letters(
    config: &RelayConfig,
    asked: Option<Vec<Uuid>>,
    done: &[Uuid],
    also: &str,
) -> Result<(), RelayError> {
    let not_found: Vec<String> = asked
        .unwrap_or_default()
        .into_iter()
        .filter(|id| !done.contains(id))
        .map(|id| id.to_string())
        .collect();
    if !not_found.is_empty() {
        return Err(RelayError::Config(format!(
            "not dead letters of {} (unknown ids, or events that are not dead-lettered{also}): {}; `outbox dead-letters list` shows the dead letters",
            config.table,
            not_found.join(", ")
        )));
    }
    Ok(())
}

pub(crate) async fn retry(config: &RelayConfig, ids: Option<Vec<Uuid>>) -> Result<(), RelayError> {
    let (mut conn, store) = open_store(config).await?;
    let retried = store.retry_dead_letters(&mut conn, ids.as_deref()).await?;
    println!("queued {} dead letter(s) for delivery again", retried.len());
    not_dead_letters(config, ids, &retried, "")
}
