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
    // Each relay publishes to topics of its own, so the broker shows who published what.
    let templates = [
        db.template.replacen('t', "a", 1),
        db.template.replacen('t', "b", 1),
    ];
    let topics = [
        templates[0].replace("{aggregatetype}", "order"),
        templates[1].replace("{aggregatetype}", "order"),
    ];
    let mut relays = [0, 1].map(|i| {
        spawn_relay(
            &db,
            &logs[i],
            &[
                ("OUTBOX_MODE", mode_name(mode)),
                ("OUTBOX_TOPICS__TEMPLATE", &templates[i]),
            ],
        )
    });

    write_batch(&db, 0, 2000).await;
    let started = Instant::now();
    while !(0..2).any(|i| log_has(&logs[i], ACTIVE)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no relay became active"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give the second relay time to have tried the lock.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let active: Vec<usize> = (0..2).filter(|&i| log_has(&logs[i], ACTIVE)).collect();
    assert_eq!(active.len(), 1, "exactly one relay is active");
    let (first, second) = (active[0], 1 - active[0]);
    settle(&db, mode, &topics[first..=first]).await;
    assert!(
        log_has(&logs[second], STANDBY),
        "the other waits as a standby"
    );
    let standby_published =
        consume_until(vec![topics[second].clone()], Duration::from_secs(5), |_| {
            false
        })
        .await;
    assert!(
        standby_published.is_empty(),
        "the standby published {} messages",
        standby_published.len()
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
    settle(&db, mode, &topics).await;
    sigterm(&relays[second]);
    let status = relays[second].wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM stops the relay with 0, got {status:?}"
    );

    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let mut received = consume_ids(topics.to_vec(), &ids, Duration::from_secs(60)).await;
    // The first relay's messages came before the second's: order them that way.
    for message in &mut received {
        let rank = if message.topic == topics[first] { 0 } else { 1 };
        message.topic = format!("{rank}-{}", message.topic);
    }
    audit(&rows, &received).assert_complete_and_ordered();
    db.drop_db().await;
}

/// Waits until every row written so far has been published.
async fn settle(db: &TestDb, mode: Mode, topics: &[String]) {
    match mode {
        Mode::Polling => db.wait_drained(Duration::from_secs(60)).await,
        Mode::Cdc => {
            let ids: Vec<Uuid> = db.rows().await.iter().map(|r| r.0).collect();
            consume_ids(topics.to_vec(), &ids, Duration::from_secs(60)).await;
        }
    }
}

/// The backend holding the leadership lock of `db`'s table, read from `pg_locks` of
/// that database only.
async fn leader_pid(db: &TestDb) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND mode = 'ExclusiveLock'
               AND classid = x'6f757462'::int4::oid
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        assert!(Instant::now() < deadline, "no relay became active");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Advisory locks belong to a database: `outbox status` names the relay of its own
/// database, never the relay of a table of the same name in another database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_relay_of_its_own_database_only() {
    let (a, b) = (TestDb::new().await, TestDb::new().await);
    let relay_a = InProcessRelay::start(a.relay_config(""));
    let relay_b = InProcessRelay::start(b.relay_config(""));
    let (pid_a, pid_b) = (leader_pid(&a).await, leader_pid(&b).await);
    for (db, pid) in [(&a, pid_a), (&b, pid_b)] {
        let status: serde_json::Value =
            serde_json::from_str(&cli(db, &["status", "--json"])).unwrap();
        assert_eq!(status["active_relay"]["pid"], pid, "{status}");
        assert_eq!(status["standby_relays"], serde_json::json!([]), "{status}");
    }
    relay_a.stop().await;
    relay_b.stop().await;
    a.drop_db().await;
    b.drop_db().await;
}
