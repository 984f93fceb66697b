//! A CDC relay next to a synchronous standby publishes a transaction only once the
//! standby has it: PostgreSQL 15's logical walsender sends a commit as soon as it is
//! flushed locally, before the synchronous standby confirmed it, so a failover in
//! between would leave the broker with events the promoted server never committed.
//!
//! Each test runs its own primary and standby (`outbox_test_kit::replicated`), so
//! stopping the standby holds up nobody else's commits.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use outbox::TableRef;
use outbox_test_kit::replicated::ReplicatedPostgres;
use sqlx::postgres::PgPoolOptions;
use sqlx::Connection;
use uuid::Uuid;

/// How long the standby is held while the writer waits: several of the relay's
/// batch waits and linger periods, so whatever it would publish reaches the broker.
const HELD: Duration = Duration::from_secs(6);

/// A migrated database of its own on the primary, with the publication and slot of
/// `outbox migrate --cdc`; its name (the Kafka transactional id is named after it, so
/// it is unique too), URL and a pool.
async fn outbox_database(pair: &ReplicatedPostgres) -> (String, String, sqlx::PgPool) {
    let suffix = Uuid::new_v4().simple().to_string();
    let database = format!("outbox_sync_{}", &suffix[..12]);
    let mut admin = sqlx::PgConnection::connect(&pair.primary_url("postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = pair.primary_url(&database);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let table = TableRef::default();
    outbox::migrate(&mut conn, &table, outbox::PayloadType::Jsonb)
        .await
        .unwrap();
    let names = outbox_postgres_cdc::CdcNames::for_table(&database, &table);
    outbox_postgres_cdc::slot::ensure_publication(&mut conn, &table, &names)
        .await
        .unwrap();
    outbox_postgres_cdc::slot::ensure_slot(&mut conn, &table, &names)
        .await
        .unwrap();
    drop(conn);
    (database, url, pool)
}

/// `outbox relay` in CDC mode on `url`, publishing to `template`, its output in `log`.
fn spawn_cdc_relay(url: &str, template: &str, log: &std::path::Path) -> std::process::Child {
    relay_command(Path::new(env!("CARGO_BIN_EXE_outbox")), url, template, log)
        .env("OUTBOX_MODE", "cdc")
        .spawn()
        .unwrap()
}

fn topic_template() -> String {
    let suffix = Uuid::new_v4().simple().to_string();
    format!("t{}.{{aggregatetype}}", &suffix[..12])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_publishes_a_commit_only_once_the_synchronous_standby_has_it() {
    let mut pair = ReplicatedPostgres::start().await;
    let (database, url, pool) = outbox_database(&pair).await;
    let template = topic_template();
    let topic = template.replace("{aggregatetype}", "order");
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("relay.log");
    let mut relay = spawn_cdc_relay(&url, &template, &log_path);

    // With the standby streaming, events flow.
    let first = event("order", "1", 1);
    let mut tx = pool.begin().await.unwrap();
    outbox::write(&mut *tx, &first).await.unwrap();
    tx.commit().await.unwrap();
    consume_ids(vec![topic.clone()], &[first.id], Duration::from_secs(60)).await;

    // The standby stops taking WAL: the writer's commit is flushed on the primary and
    // waits for the standby's confirmation.
    pair.pause_standby().await;
    let held = event("order", "1", 2);
    let writer = {
        let pool = pool.clone();
        let held = held.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            outbox::write(&mut *tx, &held).await.unwrap();
            tx.commit().await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !writer.is_finished(),
        "the writer's commit did not wait for the stopped synchronous standby: the test sees nothing"
    );
    let early = consume_ids_or_partial(vec![topic.clone()], &[held.id], HELD).await;
    let published_early = early.iter().any(|m| m.id() == held.id);
    assert!(
        !writer.is_finished(),
        "the writer's commit returned while the standby was stopped"
    );
    assert!(
        !pair.standby_has(&database, "outbox", held.id).await,
        "the stopped standby has the row: the test sees nothing"
    );

    // The standby catches up: the commit returns and the event is published.
    pair.resume_standby();
    tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer's commit returns once the standby is back")
        .unwrap();
    let later = consume_ids(vec![topic.clone()], &[held.id], Duration::from_secs(60)).await;
    let _ = relay.kill();
    let _ = relay.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        !published_early,
        "the relay published an event whose commit the synchronous standby had not confirmed (a failover then would leave it on the broker but not in the database); relay log:\n{log}"
    );
    assert!(later.iter().any(|m| m.id() == held.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cdc_relay_that_cannot_see_the_synchronous_standbys_stops_and_names_the_grant() {
    let pair = ReplicatedPostgres::start().await;
    let (database, _, pool) = outbox_database(&pair).await;
    // The README's grants for a CDC relay, without pg_monitor.
    let role = format!("relay_{}", &database[12..]);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN REPLICATION;
         GRANT SELECT, INSERT, UPDATE, DELETE ON outbox TO {role};
         GRANT SELECT ON outbox_migrations TO {role};
         GRANT SELECT, INSERT, UPDATE ON outbox_cdc_checkpoint TO {role};
         GRANT SELECT ON outbox_writer_deletes TO {role};"
    )))
    .execute(&pool)
    .await
    .unwrap();
    outbox::write(&pool, &event("order", "1", 1)).await.unwrap();
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/{database}",
        pair.primary_port
    );
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("relay.log");
    let mut relay = spawn_cdc_relay(&url, &topic_template(), &log_path);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = relay.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = relay.kill();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "the relay did not stop as misconfigured within 60 s; log:\n{log}"
    );
    assert!(
        log.contains("GRANT pg_monitor TO") && log.contains("cdc.wait_for_synchronous_standbys"),
        "the error does not name the grant and the setting; log:\n{log}"
    );
}
