//! Two relay processes on one outbox table: one is active, the other waits as a
//! standby; when the active one is killed, the standby takes over within seconds and
//! nothing is lost.

mod common;

use std::time::{Duration, Instant};

use common::*;
use outbox::Event;
use uuid::Uuid;

const ACTIVE: &str = "this relay is now the active one";
const STANDBY: &str = "waiting as a standby";

fn log_has(path: &std::path::Path, needle: &str) -> bool {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(needle)
}

async fn write_batch(db: &TestDb, from: usize, count: usize) {
    for chunk in (from..from + count).collect::<Vec<_>>().chunks(50) {
        let events: Vec<Event> = chunk
            .iter()
            .map(|n| event("order", &(n % 30).to_string(), *n))
            .collect();
        db.write(&events).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_publishes_and_the_standby_takes_over_polling() {
    failover(Mode::Polling).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_publishes_and_the_standby_takes_over_cdc() {
    failover(Mode::Cdc).await
}

async fn failover(mode: Mode) {
    let db = TestDb::for_mode(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let env = [("OUTBOX_MODE", mode_name(mode))];
    let mut relays = [
        spawn_relay(&db, &logs[0], &env),
        spawn_relay(&db, &logs[1], &env),
    ];

    write_batch(&db, 0, 2000).await;
    settle(&db, mode).await;
    // Give the second relay time to have tried the lock.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let active: Vec<usize> = (0..2).filter(|&i| log_has(&logs[i], ACTIVE)).collect();
    assert_eq!(active.len(), 1, "exactly one relay is active");
    let (first, second) = (active[0], 1 - active[0]);
    assert!(
        log_has(&logs[second], STANDBY),
        "the other waits as a standby"
    );
    assert!(
        !log_has(&logs[second], "created topic"),
        "the standby published nothing"
    );

    sigkill(&mut relays[first]);
    let killed = Instant::now();
    write_batch(&db, 2000, 1000).await;
    while !log_has(&logs[second], ACTIVE) {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "standby did not take over within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("standby took over {:?} after the kill", killed.elapsed());
    settle(&db, mode).await;
    sigterm(&relays[second]);
    let status = relays[second].wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM stops the relay with 0, got {status:?}"
    );

    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(60)).await;
    audit(&rows, &received).assert_complete_and_ordered();
    db.drop_db().await;
}

/// Waits until every row written so far has been published.
async fn settle(db: &TestDb, mode: Mode) {
    match mode {
        Mode::Polling => db.wait_drained(Duration::from_secs(60)).await,
        Mode::Cdc => {
            let ids: Vec<Uuid> = db.rows().await.iter().map(|r| r.0).collect();
            let received =
                consume_ids(vec![db.topic("order")], &ids, Duration::from_secs(60)).await;
            let seen: std::collections::HashSet<Uuid> = received.iter().map(|r| r.id()).collect();
            assert!(
                ids.iter().all(|id| seen.contains(id)),
                "not everything was published"
            );
        }
    }
}
