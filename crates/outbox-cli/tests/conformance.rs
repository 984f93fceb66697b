//! The guarantees every sink must keep, written once and run for each sink (Kafka, NATS
//! JetStream, RabbitMQ, an HTTP webhook receiver) and each mode (polling and CDC)
//! against the real services. A new sink gets the whole suite with one `conformance!`
//! line.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use outbox::Event;
use outbox_test_kit::Poison;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Runs every case for one sink: `mod SINK { mod CASE { polling, cdc } }`.
macro_rules! conformance {
    ($sink:ident, $kind:expr) => {
        mod $sink {
            use super::*;
            cases!(
                $kind;
                round_trip_publishes_destination_key_value_and_headers,
                rolled_back_transaction_publishes_nothing,
                plain_sql_writers_are_published_the_same_way,
                late_committing_transaction_is_not_skipped,
                per_aggregate_order_holds_with_concurrent_writers,
                poison_event_is_dead_lettered_and_skip_lets_its_aggregate_go_on,
                poison_event_parks_its_aggregate_until_skipped,
                illegal_destination_is_dead_lettered_without_blocking,
                dead_letters_are_listed_and_retried_from_the_command_line,
            );
        }
    };
}

macro_rules! cases {
    ($kind:expr; $($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn polling() {
                    super::super::$case(Mode::Polling, $kind).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cdc() {
                    super::super::$case(Mode::Cdc, $kind).await
                }
            }
        )*
    };
}

/// Cases that need a failure the sink recovers from by itself: the test's webhook
/// receiver answers 500 to a flaky event's first requests.
macro_rules! recovering_sink {
    ($sink:ident, $kind:expr) => {
        mod $sink {
            use super::*;
            cases!(
                $kind;
                failing_event_parks_its_aggregate_while_others_flow,
                retried_dead_letter_goes_before_its_parked_aggregate,
            );
        }
    };
}

conformance!(kafka, SinkKind::Kafka);
conformance!(nats, SinkKind::Nats);
conformance!(rabbitmq, SinkKind::RabbitMq);
conformance!(webhook, SinkKind::Webhook);
conformance!(webhook_batches, SinkKind::WebhookBatches);

mod recovering {
    use super::*;
    recovering_sink!(webhook, SinkKind::Webhook);
    recovering_sink!(webhook_batches, SinkKind::WebhookBatches);
}

/// A database for `mode`, a sink of `kind` and a relay between them.
async fn start(mode: Mode, kind: SinkKind, extra_toml: &str) -> (TestDb, TestSink, InProcessRelay) {
    let db = TestDb::for_mode(mode).await;
    let sink = db.sink(kind).await;
    let relay = InProcessRelay::start(db.relay_config_for_sink(mode, &sink, extra_toml));
    (db, sink, relay)
}

async fn finish(db: TestDb, sink: TestSink) {
    sink.clean_up().await;
    db.drop_db().await;
}

/// `outbox dead-letters list` shows a dead letter with its reason; `retry` queues it
/// again and the relay tries it once more (here it fails again: the sink still refuses
/// it, so it is a dead letter again, with a later time and a fresh attempt count).
async fn dead_letters_are_listed_and_retried_from_the_command_line(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let poison = sink.poison();
    let bad = poison_event(&poison, "1");
    db.write(std::slice::from_ref(&bad)).await;
    dead_letter(&db, bad.id).await;
    let list = cli(&db, &["dead-letters", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(rows[0]["id"], bad.id.to_string());
    assert!(
        rows[0]["last_error"]
            .as_str()
            .unwrap()
            .contains(poison.reason),
        "{rows}"
    );
    let status: serde_json::Value = serde_json::from_str(&cli(&db, &["status", "--json"])).unwrap();
    assert_eq!(status["dead_lettered"], 1);
    assert!(
        status["active_relay"].is_object(),
        "the in-process relay holds the lock: {status}"
    );
    let first: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT dead_lettered_at FROM outbox WHERE id = $1")
            .bind(bad.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();

    let retried = cli(&db, &["dead-letters", "retry", &bad.id.to_string()]);
    assert!(retried.contains("queued 1"), "{retried}");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let again: Option<(chrono::DateTime<chrono::Utc>, i32)> = sqlx::query_as(
            "SELECT dead_lettered_at, attempts FROM outbox WHERE id = $1 AND dead_lettered_at > $2",
        )
        .bind(bad.id)
        .bind(first)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some((_, attempts)) = again {
            assert_eq!(attempts, 1, "the retry started from a fresh attempt count");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retried event was not tried again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
    finish(db, sink).await;
}

/// The event of `poison`, in aggregate `aggregate_id`.
fn poison_event(poison: &Poison, aggregate_id: &str) -> Event {
    let payload: serde_json::Value = serde_json::from_str(&poison.payload).unwrap();
    let mut event = Event::new(&poison.aggregate_type, aggregate_id, "Poison", payload);
    for (name, value) in &poison.headers {
        event = event.with_header(name, value);
    }
    event
}

const SKIP_DEAD_LETTERS: &str = "[delivery]\non_dead_letter = \"skip\"\n";

/// With `on_dead_letter = "skip"`: an event the sink refuses for good (for Kafka and
/// NATS a payload larger than the broker takes) is dead-lettered with its reason at
/// once; other aggregates, and the poison's own later events, keep flowing.
async fn poison_event_is_dead_lettered_and_skip_lets_its_aggregate_go_on(
    mode: Mode,
    kind: SinkKind,
) {
    let (db, sink, relay) = start(mode, kind, SKIP_DEAD_LETTERS).await;
    let poison = sink.poison();
    let bad = poison_event(&poison, "poison");
    let mut events = vec![
        event(&poison.aggregate_type, "poison", 0),
        bad.clone(),
        event(&poison.aggregate_type, "poison", 2),
    ];
    for n in 0..200 {
        events.push(event("order", &format!("ok-{}", n % 20), n));
    }
    db.write(&events).await;
    let wanted: Vec<Uuid> = events
        .iter()
        .filter(|e| e.id != bad.id && e.aggregate_type == "order")
        .map(|e| e.id)
        .collect();
    let received = sink.read_ids(&["order"], &wanted, WAIT).await;
    let (attempts, error) = dead_letter(&db, bad.id).await;
    relay.stop().await;
    let seen: HashSet<Uuid> = received.iter().map(|r| r.id()).collect();
    assert!(
        wanted.iter().all(|id| seen.contains(id)),
        "other events delivered"
    );
    assert!(
        !seen.contains(&bad.id),
        "the poison never reached the broker"
    );
    assert_eq!(attempts, 1, "dead-lettered at the first attempt");
    assert!(error.contains(poison.reason), "reason recorded: {error}");
    finish(db, sink).await;
}

/// By default a dead letter parks its aggregate: the aggregate's later events, in the
/// poison's batch and written after it, wait in the table while every other aggregate
/// flows; `outbox dead-letters skip` lets them go, in their order.
async fn poison_event_parks_its_aggregate_until_skipped(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let poison = sink.poison();
    let parked_type = poison.aggregate_type.as_str();
    let before = event(parked_type, "parked", 0);
    db.write(std::slice::from_ref(&before)).await;
    sink.read_ids(&[parked_type], &[before.id], WAIT).await;

    let bad = poison_event(&poison, "parked");
    let behind_in_batch = event(parked_type, "parked", 2);
    let mut events = vec![bad.clone(), behind_in_batch.clone()];
    let others: Vec<Event> = (0..100)
        .map(|n| event("order", &format!("other-{}", n % 10), n))
        .collect();
    events.extend(others.iter().cloned());
    db.write(&events).await;
    let other_ids: Vec<Uuid> = others.iter().map(|e| e.id).collect();
    sink.read_ids(&["order"], &other_ids, WAIT).await;
    let (_, error) = dead_letter(&db, bad.id).await;
    assert!(error.contains(poison.reason), "reason recorded: {error}");

    // Written after the dead letter: parked too, while a later aggregate still flows.
    let behind_later = event(parked_type, "parked", 3);
    let after = event("order", "after", 0);
    db.write(&[behind_later.clone(), after.clone()]).await;
    let mut parked = vec![behind_in_batch.id, behind_later.id];
    if mode == Mode::Cdc {
        // A row its writer deleted at once: the stream still carries it, and the relay
        // keeps it waiting in the table, inserted again.
        let deleted = event(parked_type, "parked", 4);
        db.write_and_delete(&deleted).await;
        parked.push(deleted.id);
    }
    let last = event("order", "after", 1);
    db.write(std::slice::from_ref(&last)).await;
    sink.read_ids(&["order"], &[after.id, last.id], WAIT).await;
    // A moment more for anything that would overtake: the broker must not have them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = sink
        .read_ids_or_partial(&[parked_type], &parked, Duration::from_millis(500))
        .await;
    assert!(
        received.iter().all(|r| !parked.contains(&r.id())),
        "an event of the parked aggregate went past its dead letter"
    );
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE id = ANY($1)
           AND published_at IS NULL AND dead_lettered_at IS NULL AND attempts = 0",
    )
    .bind(&parked[..])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        waiting,
        parked.len() as i64,
        "the parked events wait in the table, no attempt used"
    );
    let list: serde_json::Value =
        serde_json::from_str(&cli(&db, &["dead-letters", "list", "--json"])).unwrap();
    assert!(list[0]["skipped_at"].is_null(), "{list}");
    let status: serde_json::Value = serde_json::from_str(&cli(&db, &["status", "--json"])).unwrap();
    assert_eq!(status["parked_aggregates"], 1, "{status}");
    // The gauge follows within the monitor's 5 s round.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while relay.metrics.parked_aggregates.get() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "outbox_parked_aggregates = {}",
            relay.metrics.parked_aggregates.get()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let skipped = cli(&db, &["dead-letters", "skip", &bad.id.to_string()]);
    assert!(skipped.contains("skipped 1"), "{skipped}");
    let received = sink.read_ids(&[parked_type], &parked, WAIT).await;
    relay.stop().await;
    let order: Vec<Uuid> = received
        .iter()
        .map(|r| r.id())
        .filter(|id| parked.contains(id))
        .collect();
    assert_eq!(order, parked, "the parked events went on in their order");
    assert!(
        !received.iter().any(|r| r.id() == bad.id),
        "the poison never reached the broker"
    );
    let list: serde_json::Value =
        serde_json::from_str(&cli(&db, &["dead-letters", "list", "--json"])).unwrap();
    assert_eq!(list[0]["id"], bad.id.to_string());
    assert!(list[0]["skipped_at"].is_string(), "{list}");
    let status: serde_json::Value = serde_json::from_str(&cli(&db, &["status", "--json"])).unwrap();
    assert_eq!(status["parked_aggregates"], 0, "{status}");
    finish(db, sink).await;
}

/// An event whose delivery fails (the receiver answers 500, then recovers) parks its
/// aggregate in both modes: its later events wait behind it, while events of other
/// aggregates written after the failure go out at once (CDC does not hold its stream
/// for it). Once it is delivered, its aggregate follows in order.
async fn failing_event_parks_its_aggregate_while_others_flow(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(
        mode,
        kind,
        "[delivery]\ninitial_backoff = \"2s\"\nmax_backoff = \"2s\"\n",
    )
    .await;
    let flaky = flaky_event("1");
    let behind = event("flaky", "1", 1);
    db.write(&[flaky.clone(), behind.clone()]).await;
    // The first answer was a 500: the event waits for its retry.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if sink.flaky_failures_answered() > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flaky event was never tried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let others: Vec<Event> = (0..20)
        .map(|n| event("order", &format!("other-{n}"), n))
        .collect();
    db.write(&others).await;
    let other_ids: Vec<Uuid> = others.iter().map(|e| e.id).collect();
    sink.read_ids(&["order"], &other_ids, WAIT).await;
    let flaky_arrived = sink
        .read_ids_or_partial(&["flaky"], &[flaky.id], Duration::from_millis(100))
        .await
        .iter()
        .any(|r| r.id() == flaky.id);
    assert!(
        !flaky_arrived,
        "the others went out only once the failing event was delivered: its failure held them"
    );
    let received = sink
        .read_ids(&["flaky"], &[flaky.id, behind.id], WAIT)
        .await;
    relay.stop().await;
    let order: Vec<Uuid> = received
        .iter()
        .map(|r| r.id())
        .filter(|id| [flaky.id, behind.id].contains(id))
        .collect();
    assert_eq!(
        order,
        vec![flaky.id, behind.id],
        "the aggregate kept its order"
    );
    let (attempts, dead): (i32, bool) =
        sqlx::query_as("SELECT attempts, dead_lettered_at IS NOT NULL FROM outbox WHERE id = $1")
            .bind(flaky.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(!dead);
    assert!(
        attempts >= 1,
        "its failed attempts were counted: {attempts}"
    );
    finish(db, sink).await;
}

/// The event of a flaky aggregate: the receiver refuses its first requests with 500.
fn flaky_event(aggregate_id: &str) -> Event {
    Event::new(
        "flaky",
        aggregate_id,
        "Tested",
        serde_json::Value::Object(
            [(outbox_test_kit::WEBHOOK_FLAKY.to_string(), true.into())]
                .into_iter()
                .collect(),
        ),
    )
}

/// A dead letter retried from the command line goes out first, then its aggregate's
/// parked events, in their order: the aggregate's order holds across the dead letter.
async fn retried_dead_letter_goes_before_its_parked_aggregate(mode: Mode, kind: SinkKind) {
    // Two attempts, both refused: a dead letter. Its retry is refused once more (the
    // receiver's third 500), then delivered.
    let (db, sink, relay) = start(
        mode,
        kind,
        "[delivery]\nmax_attempts = 2\ninitial_backoff = \"100ms\"\nmax_backoff = \"100ms\"\n",
    )
    .await;
    let flaky = flaky_event("1");
    let behind_in_batch = event("flaky", "1", 1);
    db.write(&[flaky.clone(), behind_in_batch.clone()]).await;
    let (attempts, error) = dead_letter(&db, flaky.id).await;
    assert_eq!(attempts, 2, "{error}");
    let behind_later = event("flaky", "1", 2);
    let other = event("order", "1", 0);
    db.write(&[behind_later.clone(), other.clone()]).await;
    sink.read_ids(&["order"], &[other.id], WAIT).await;
    let aggregate = [flaky.id, behind_in_batch.id, behind_later.id];
    let early = sink
        .read_ids_or_partial(&["flaky"], &aggregate, Duration::from_millis(500))
        .await;
    assert!(
        early.iter().all(|r| !aggregate.contains(&r.id())),
        "an event of the parked aggregate went out before its dead letter was retried"
    );

    let retried = cli(&db, &["dead-letters", "retry", &flaky.id.to_string()]);
    assert!(retried.contains("queued 1"), "{retried}");
    let received = sink.read_ids(&["flaky"], &aggregate, WAIT).await;
    relay.stop().await;
    let order: Vec<Uuid> = received
        .iter()
        .map(|r| r.id())
        .filter(|id| aggregate.contains(id))
        .collect();
    assert_eq!(order, aggregate, "the retried dead letter went first");
    assert_eq!(
        sink.flaky_failures_answered(),
        outbox_test_kit::FLAKY_FAILURES
    );
    finish(db, sink).await;
}

/// An aggregatetype that yields a destination the sink refuses is dead-lettered at once,
/// even when the writer deleted the row in the same transaction (CDC keeps it as a dead
/// letter).
async fn illegal_destination_is_dead_lettered_without_blocking(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let (illegal, why) = sink.illegal_aggregate_type();
    let bad = event(&illegal, "1", 0);
    let good = event("order", "1", 1);
    db.write(&[bad.clone(), good.clone()]).await;
    sink.read_ids(&["order"], &[good.id], WAIT).await;
    let (_, error) = dead_letter(&db, bad.id).await;
    if mode == Mode::Cdc {
        // Insert and delete in one transaction: the dead letter is kept all the same.
        let gone = event(&illegal, "2", 2);
        db.write_and_delete(&gone).await;
        let (_, error) = dead_letter(&db, gone.id).await;
        assert!(error.contains(why), "{error}");
    }
    relay.stop().await;
    assert!(error.contains(why), "{error}");
    finish(db, sink).await;
}

async fn round_trip_publishes_destination_key_value_and_headers(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let order = Event::new(
        "order",
        "42",
        "OrderCreated",
        serde_json::json!({"total": 1299}),
    )
    .with_header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    let user = Event::new(
        "user",
        "u-7",
        "UserRegistered",
        serde_json::json!({"email": "a@b.c"}),
    );
    db.write(&[order.clone(), user.clone()]).await;

    let received = sink
        .read_ids(&["order", "user"], &[order.id, user.id], WAIT)
        .await;
    relay.stop().await;

    let got = received
        .iter()
        .find(|r| r.id() == order.id)
        .expect("order event published");
    assert_eq!(got.topic, sink.destination("order"));
    assert_eq!(got.key, "42");
    let value: serde_json::Value = serde_json::from_slice(got.value.as_deref().unwrap()).unwrap();
    assert_eq!(value, serde_json::json!({"total": 1299}));
    assert_eq!(got.headers["type"], "OrderCreated");
    assert_eq!(got.headers["aggregatetype"], "order");
    assert_eq!(got.headers["traceparent"], order.headers["traceparent"]);
    let got = received
        .iter()
        .find(|r| r.id() == user.id)
        .expect("user event published");
    assert_eq!(got.topic, sink.destination("user"));
    assert_eq!(got.key, "u-7");

    if mode == Mode::Polling {
        // Marked, not deleted (on_publish = mark is the default).
        let published: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(published, 2);
    }
    finish(db, sink).await;
}

async fn rolled_back_transaction_publishes_nothing(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let doomed: Vec<Event> = (0..20).map(|n| event("order", "1", n)).collect();
    let mut tx = db.pool.begin().await.unwrap();
    outbox::write_all(&mut *tx, &doomed).await.unwrap();
    tx.rollback().await.unwrap();
    // A marker committed after the rollback: once it arrives, anything of the rolled-back
    // transaction would have arrived before it.
    let marker = event("order", "1", 99);
    db.write(std::slice::from_ref(&marker)).await;

    let received = sink.read_ids(&["order"], &[marker.id], WAIT).await;
    relay.stop().await;
    let doomed_ids: HashSet<Uuid> = doomed.iter().map(|e| e.id).collect();
    assert!(
        received.iter().any(|r| r.id() == marker.id),
        "marker published"
    );
    assert!(
        received.iter().all(|r| !doomed_ids.contains(&r.id())),
        "an event of a rolled-back transaction was published"
    );
    finish(db, sink).await;
}

async fn plain_sql_writers_are_published_the_same_way(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    // What a service in any language does: one INSERT in its own transaction, no library.
    let id = Uuid::new_v4();
    sqlx::raw_sql(sqlx::AssertSqlSafe(String::from(&format!(
        "BEGIN;
         INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload, headers)
         VALUES ('{id}', 'invoice', 'inv-9', 'InvoiceIssued', '{{\"amount\": 5}}', '{{\"tenant\": \"acme\"}}');
         COMMIT;"
    ))))
    .execute(&db.pool)
    .await
    .unwrap();
    let received = sink.read_ids(&["invoice"], &[id], WAIT).await;
    relay.stop().await;
    let got = received
        .iter()
        .find(|r| r.id() == id)
        .expect("plain-SQL event published");
    assert_eq!(got.key, "inv-9");
    assert_eq!(got.headers["type"], "InvoiceIssued");
    assert_eq!(got.headers["tenant"], "acme");
    let value: serde_json::Value = serde_json::from_slice(got.value.as_deref().unwrap()).unwrap();
    assert_eq!(value, serde_json::json!({"amount": 5}));
    finish(db, sink).await;
}

/// DESIGN.md's first pitfall: a transaction that took a lower `seq` but commits after a
/// higher one must still be published (no `seq > last_seen` high-water mark).
async fn late_committing_transaction_is_not_skipped(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "").await;
    let early = event("order", "a", 1);
    let late = event("order", "b", 2);
    let mut slow = db.pool.begin().await.unwrap();
    outbox::write(&mut *slow, &early).await.unwrap(); // takes the lower seq
    db.write(std::slice::from_ref(&late)).await; // higher seq, commits first
    let first = sink.read_ids(&["order"], &[late.id], WAIT).await;
    assert!(
        first.iter().all(|r| r.id() != early.id),
        "uncommitted event published"
    );
    slow.commit().await.unwrap();
    let received = sink.read_ids(&["order"], &[early.id, late.id], WAIT).await;
    relay.stop().await;
    assert!(
        received.iter().any(|r| r.id() == early.id),
        "late commit skipped"
    );
    let rows = db.rows().await;
    assert!(
        rows[0].0 == early.id && rows[0].2 < rows[1].2,
        "early event holds the lower seq"
    );
    finish(db, sink).await;
}

/// 4 concurrent writer tasks over 50 aggregates; writers of one aggregate serialize on
/// it (as a row lock on the business entity would), as DESIGN.md requires.
async fn per_aggregate_order_holds_with_concurrent_writers(mode: Mode, kind: SinkKind) {
    let (db, sink, relay) = start(mode, kind, "[polling]\nbatch_size = 137\n").await;
    let mut writers = Vec::new();
    for writer in 0..4u64 {
        let pool = db.pool.clone();
        writers.push(tokio::spawn(async move {
            let mut state = writer * 7919 + 1;
            for n in 0..250usize {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let aggregate = format!("agg-{}", (state >> 33) % 50);
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(&aggregate)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let events: Vec<Event> = (0..1 + n % 3)
                    .map(|k| event("order", &aggregate, n * 10 + k))
                    .collect();
                outbox::write_all(&mut *tx, &events).await.unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let rows = db.rows().await;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let received = sink.read_ids(&["order"], &ids, WAIT).await;
    relay.stop().await;
    let audit = audit(&rows, &received);
    audit.assert_complete_and_ordered();
    assert!(audit.committed >= 1000);
    finish(db, sink).await;
}
