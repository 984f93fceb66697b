//! Crashes at the boundaries that real services alone cannot hit on purpose: the real
//! binary, built with crash points (`FAILPOINTS=<name>=return` exits it with code 86
//! there), is stopped right after Kafka acknowledged a batch but before anything was
//! recorded or confirmed, right after recording (CDC: confirming), and right before a
//! dead letter is stored. A relay started again must then publish everything, in order,
//! and keep the dead letter. Both modes.

mod common;

use std::time::{Duration, Instant};

use common::audit as audit_of;
use common::*;
use outbox::Event;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

for_each_mode!(
    crash_after_publish_before_record_loses_nothing,
    crash_after_record_loses_nothing,
    crash_before_a_dead_letter_is_stored_keeps_it,
);

async fn crash_after_publish_before_record_loses_nothing(mode: Mode) {
    crash_at("relay-published-not-recorded", mode, false).await
}

async fn crash_after_record_loses_nothing(mode: Mode) {
    crash_at("relay-recorded", mode, false).await
}

async fn crash_before_a_dead_letter_is_stored_keeps_it(mode: Mode) {
    crash_at("relay-dead-letter-write", mode, true).await
}

async fn crash_at(point: &str, mode: Mode, with_poison: bool) {
    let db = TestDb::for_mode(mode).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    // The topic exists before the crash run, so its first batch is acknowledged.
    let warmup = event("order", "0", 0);
    db.write(std::slice::from_ref(&warmup)).await;
    let mut relay = spawn_relay(&db, &log, &[("OUTBOX_MODE", mode_name(mode))]);
    consume_ids(vec![db.topic("order")], &[warmup.id], WAIT).await;
    sigterm(&relay);
    assert!(relay.wait().unwrap().success());

    let failpoint = format!("{point}=return");
    let mut relay = spawn_relay(
        &db,
        &log,
        &[("OUTBOX_MODE", mode_name(mode)), ("FAILPOINTS", &failpoint)],
    );
    let mut events: Vec<Event> = Vec::new();
    let poison = event("bad topic", "p", 0);
    if with_poison {
        db.write(std::slice::from_ref(&poison)).await;
    }
    for n in 1..=200 {
        events.push(event("order", &(n % 10).to_string(), n));
    }
    db.write(&events).await;

    // The crash point stops the relay.
    let started = Instant::now();
    let status = loop {
        if let Some(status) = relay.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > WAIT {
            sigkill(&mut relay);
            panic!(
                "the relay never reached {point}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        status.code(),
        Some(outbox_relay::failpoints::EXIT_CODE),
        "the relay stopped at {point}"
    );

    let mut relay = spawn_relay(&db, &log, &[("OUTBOX_MODE", mode_name(mode))]);
    // Committed after everything else: once it arrives, the restarted relay has gone
    // through every row before it (seq order when polling, commit order in CDC).
    let marker = event("order", "0", 999);
    db.write(std::slice::from_ref(&marker)).await;
    let rows: Vec<(Uuid, String, i64)> = db
        .rows()
        .await
        .into_iter()
        .filter(|(id, _, _)| *id != poison.id)
        .collect();
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = consume_ids(vec![db.topic("order")], &ids, WAIT).await;
    let dead = if with_poison {
        Some(dead_letter(&db, poison.id).await)
    } else {
        None
    };
    sigterm(&relay);
    let stopped = relay.wait().unwrap();
    assert!(stopped.success(), "{stopped:?}");
    audit_of(&rows, &received).assert_complete_and_ordered();
    if let Some((_, error)) = dead {
        assert!(error.contains("not a legal Kafka topic name"), "{error}");
    }
    if point == "relay-published-not-recorded" {
        // The whole topic, not just until every id was seen once.
        let everything =
            consume_until(vec![db.topic("order")], Duration::from_secs(10), |_| false).await;
        let again = audit_of(&rows, &everything).duplicates;
        assert!(
            again > 0,
            "what was published before the crash was published again; relay log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    db.drop_db().await;
}
