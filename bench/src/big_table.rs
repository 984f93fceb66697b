//! The big-table phase of a polling session: does a table that keeps millions of
//! published rows (the retention) slow polling down, and does purging them disturb
//! publishing?
//!
//! The table gets `rows` published rows (1 KiB payloads, published within the last day,
//! so inside any sensible retention), written in plain SQL and then vacuumed and
//! analyzed, as autovacuum would have by the time a table grows that large, and
//! checkpointed (the fill's writes done before anything is measured). The session's step at the compared rate and its backlog drain run again. Then a fifth as
//! many rows, published 30 days ago, past the default retention (7 days), are added; once
//! the relay's purge (every minute, 1,000 rows per statement) has started on them, the
//! step runs once more while it purges.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::arrivals::Arrivals;
use crate::db::BenchDb;
use crate::report::{BigTable, Step, Verdict};
use crate::session::{self, Context};
use crate::system::Running;

/// Rows per INSERT statement of the fill (each its own transaction).
const FILL_CHUNK: u64 = 100_000;
/// How old the rows written for the purge are: past any retention up to 29 days.
const PURGED_AGE: &str = "30 days";
/// Rows older than this count as the purge's (the retained ones are at most a day old).
const PURGE_AGE_FLOOR: &str = "20 days";

/// The step rate compared: the highest step of the fresh table that was kept up with,
/// at most 10k events/s (the latency goals stop there).
pub fn compared_rate(steps: &[Step]) -> Option<u32> {
    steps
        .iter()
        .filter(|s| s.verdict == Verdict::Sustained && s.target_rate <= 10_000)
        .map(|s| s.target_rate)
        .max()
}

pub async fn measure(
    cx: &Context<'_>,
    db: &BenchDb,
    sut: &mut Running,
    arrivals: &Arrivals,
    rate: u32,
    rows: u64,
) -> Result<BigTable> {
    let payload = cx.shape.payload_bytes.saturating_sub(40).max(1) as i32;
    let started = Instant::now();
    fill(db, rows, payload, "now() - random() * interval '1 day'").await?;
    vacuum(db).await?;
    checkpoint(db).await?;
    let fill_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "bench: big table: {rows} published rows written and vacuumed in {fill_seconds:.0} s"
    );
    sut.check_alive()?;

    let step = session::step(cx, db, sut, arrivals, rate, cx.plan.step_seconds).await?;
    session::report_step_named("big table", "step", &step);
    let backlog = session::backlog(cx, db, sut, arrivals, cx.plan.backlog_events, None).await?;
    eprintln!(
        "bench: big table backlog: {:.0} events/s ({:.2} s)",
        backlog.events_per_sec, backlog.drain_seconds
    );

    let purge_rows = rows / 5;
    fill(
        db,
        purge_rows,
        payload,
        &format!("now() - interval '{PURGED_AGE}'"),
    )
    .await?;
    checkpoint(db).await?;
    let purge_started_after = wait_for_purge(db, purge_rows).await?;
    let before = past_retention(db).await?;
    let purge_step = session::step(cx, db, sut, arrivals, rate, cx.plan.step_seconds).await?;
    let after = past_retention(db).await?;
    session::report_step_named("big table", "step during the purge", &purge_step);
    eprintln!(
        "bench: big table: the purge started {purge_started_after:.0} s after its rows were written; {} rows purged during the step, {after} left after it",
        before - after
    );
    Ok(BigTable {
        retained_rows: rows,
        fill_seconds,
        step,
        backlog,
        purge_rows,
        purge_step,
        purged_during_step: before - after,
        purge_rows_left_after_step: after,
    })
}

/// Writes `rows` published rows, `published_at` = `published` (an SQL expression).
async fn fill(db: &BenchDb, rows: u64, payload: i32, published: &str) -> Result<()> {
    let sql = format!(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, created_at, published_at)
         SELECT gen_random_uuid(), 'order', (n % 1000)::text, 'BenchRetained',
                jsonb_build_object('n', n, 'data', repeat('r', $3)), p, p
         FROM generate_series($1::bigint, $2::bigint) AS n,
              LATERAL (SELECT {published} + n * interval '0') AS at(p)"
    );
    let mut first = 0;
    while first < rows {
        let last = (first + FILL_CHUNK).min(rows) - 1;
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(first as i64)
            .bind(last as i64)
            .bind(payload)
            .execute(&db.pool)
            .await?;
        first = last + 1;
    }
    Ok(())
}

async fn vacuum(db: &BenchDb) -> Result<()> {
    sqlx::query("VACUUM (ANALYZE) outbox")
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Writes the fill's dirty pages out now: otherwise the checkpoints its WAL sets off
/// (every `max_wal_size`) land in the step measured next, and the step pays for the
/// fill, not for the table's size.
async fn checkpoint(db: &BenchDb) -> Result<()> {
    sqlx::query("CHECKPOINT").execute(&db.pool).await?;
    Ok(())
}

/// Rows written for the purge that are still in the table.
async fn past_retention(db: &BenchDb) -> Result<u64> {
    let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM outbox
         WHERE published_at IS NOT NULL AND published_at < now() - interval '{PURGE_AGE_FLOOR}'"
    )))
    .fetch_one(&db.pool)
    .await?;
    Ok(count as u64)
}

/// Waits until the relay's purge has begun on the rows past the retention (it runs
/// every minute); returns after how many seconds.
async fn wait_for_purge(db: &BenchDb, written: u64) -> Result<f64> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(90) {
        if past_retention(db).await? < written {
            return Ok(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("the relay did not purge rows past the retention within 90 s (it should every minute)")
}
