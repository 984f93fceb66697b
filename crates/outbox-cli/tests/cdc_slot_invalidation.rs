//! A slot that PostgreSQL invalidated (it fell behind `max_slot_wal_keep_size`) is never
//! re-created silently: the relay and `outbox migrate --cdc` exit with code 3 and say
//! what happened and how to recover. Alone in its test binary because it lowers a
//! server-wide setting for a moment.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Puts the server setting back even when the test fails.
struct ResetKeepSize;

impl Drop for ResetKeepSize {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-XAtq",
                &admin_url(),
                "-c",
                "ALTER SYSTEM RESET max_slot_wal_keep_size",
                "-c",
                "SELECT pg_reload_conf()",
            ])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_stops_the_relay_with_the_documented_message() {
    let db = TestDb::for_mode(Mode::Cdc).await;
    let slot = db.cdc_names().slot;
    let _reset = ResetKeepSize;
    sqlx::query("ALTER SYSTEM SET max_slot_wal_keep_size = '16MB'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE filler (data text)")
        .execute(&db.pool)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status: Option<String> =
            sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1")
                .bind(&slot)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if status.as_deref() == Some("lost") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slot was not invalidated (wal_status {status:?})"
        );
        // About 20 MB of WAL, a segment switch, and a checkpoint, which invalidates
        // slots that fell too far behind.
        sqlx::raw_sql(
            "INSERT INTO filler SELECT repeat(md5(i::text), 32) FROM generate_series(1, 20000) i;
             SELECT pg_switch_wal();
             CHECKPOINT;",
        )
        .execute(&db.pool)
        .await
        .unwrap();
    }

    let output = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .arg("relay")
        .env("OUTBOX_DATABASE_URL", &db.url)
        .env("OUTBOX_KAFKA_BROKERS", brokers())
        .env("OUTBOX_MODE", "cdc")
        .env("OUTBOX_HTTP__LISTEN", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(3),
        "exit code 3 expected:\n{stderr}"
    );
    for needle in [
        "invalidated",
        &slot,
        "polling mode",
        "pg_drop_replication_slot",
        "outbox migrate --cdc",
    ] {
        assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
    }

    let output = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["migrate", "--cdc"])
        .env("OUTBOX_DATABASE_URL", &db.url)
        .env_remove("OUTBOX_KAFKA_BROKERS")
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status: Option<String> =
        sqlx::query_scalar("SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1")
            .bind(&slot)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        status.as_deref(),
        Some("lost"),
        "the slot was not re-created behind the operator's back"
    );
    db.drop_db().await;
}
