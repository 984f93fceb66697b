//! The inbox against the real PostgreSQL and Kafka: duplicates, dead letters,
//! per-aggregate order under concurrency, rebalances and retention.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    apply, brokers, business_handler, delete_topics, read_topic, set_topic_config, wait_until,
    Running, TestEnv, TestMessage, PARTITIONS,
};
use outbox_inbox::{handler_fn, HandlerError, InboxMessage};
use rdkafka::consumer::Consumer;
use uuid::Uuid;

/// The same event delivered again (same id) is applied once: by the same consumer, by
/// a concurrent lane (same id under another key), and by a new consumer group that
/// replays the whole topic under the same consumer name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_applied_once() {
    let env = TestEnv::new().await;
    let originals: Vec<TestMessage> = (0..20)
        .flat_map(|aggregate| {
            (0..5).map(move |seq| TestMessage::new(&format!("agg-{aggregate}"), seq))
        })
        .collect();
    // Every message again, then ten of them once more under another key (another lane,
    // so the two copies can run at the same time).
    let mut messages = originals.clone();
    messages.extend(originals.iter().cloned());
    messages.extend(originals.iter().take(10).map(|m| TestMessage {
        key: "another-key".into(),
        ..m.clone()
    }));
    env.produce(&messages).await;
    let total = messages.len() as u64;
    assert_eq!(total, 210);

    let inbox = env.builder("dedup").build().unwrap();
    let running = Running::start(inbox, business_handler(Duration::ZERO));
    let stats = running.stats.clone();
    wait_until(Duration::from_secs(60), "all 210 messages consumed", || {
        let stats = stats.clone();
        async move { stats.processed() + stats.duplicates() == total }
    })
    .await;
    let stats = running.stop().await;
    assert_eq!(stats.processed(), 100);
    assert_eq!(stats.duplicates(), 110);
    assert_eq!(env.business_count().await, 100, "each event applied once");
    assert_eq!(env.business_distinct().await, 100);
    assert_eq!(env.inbox_count().await, 100);

    // A new group reads the topic from the start: under the same consumer name every
    // message is a duplicate.
    let replay_group = format!("{}-replay", env.group);
    let inbox =
        outbox_inbox::Inbox::builder(env.pool.clone(), common::brokers(), replay_group, "dedup")
            .topics([env.topic.clone()])
            .build()
            .unwrap();
    let running = Running::start(inbox, business_handler(Duration::ZERO));
    let stats = running.stats.clone();
    wait_until(Duration::from_secs(60), "the replay consumed", || {
        let stats = stats.clone();
        async move { stats.duplicates() == total }
    })
    .await;
    let stats = running.stop().await;
    assert_eq!(stats.processed(), 0);
    assert_eq!(env.business_count().await, 100);
    env.cleanup().await;
}

/// A handler that keeps failing has its message dead-lettered with the reason, after
/// `max_attempts` (or at once for a permanent error); so does one that swallows an SQL
/// error; messages without a usable id are dead-lettered too; everything else,
/// including the same aggregate's later events, is applied, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_messages_are_dead_lettered_and_the_rest_flows() {
    let env = TestEnv::new().await;
    let poison = TestMessage::new("A", 0);
    let rejected = TestMessage::new("B", 0);
    // Its handler ignores an SQL error and returns Ok: PostgreSQL would turn the
    // COMMIT into a silent rollback, so the inbox must count it as a failure.
    let swallowed = TestMessage::new("S", 0);
    let no_id = TestMessage {
        id_header: None,
        ..TestMessage::new("N", 0)
    };
    let bad_id = TestMessage {
        id_header: Some("order-42".into()),
        ..TestMessage::new("N", 1)
    };
    let mut messages = vec![
        poison.clone(),
        TestMessage::new("A", 1),
        TestMessage::new("A", 2),
        rejected.clone(),
        TestMessage::new("B", 1),
        swallowed.clone(),
        no_id,
        bad_id,
    ];
    for aggregate in 0..10 {
        for seq in 0..3 {
            messages.push(TestMessage::new(&format!("C{aggregate}"), seq));
        }
    }
    env.produce(&messages).await;

    // Every handler call, in order: (aggregate, seq, attempt).
    let calls: Arc<Mutex<Vec<(String, i32, u32)>>> = Arc::default();
    let handler = {
        let calls = calls.clone();
        let poison = poison.id();
        let rejected = rejected.id();
        let swallowed = swallowed.id();
        handler_fn(move |tx, message: &InboxMessage| {
            let calls = calls.clone();
            Box::pin(async move {
                let seq = message.payload_json::<serde_json::Value>()?["seq"]
                    .as_i64()
                    .unwrap() as i32;
                calls.lock().unwrap().push((
                    message.key_str().unwrap().to_string(),
                    seq,
                    message.attempt(),
                ));
                if message.id() == poison {
                    return Err(HandlerError::msg("the handler always fails on this one"));
                }
                if message.id() == rejected {
                    return Err(HandlerError::permanent("unknown event type"));
                }
                if message.id() == swallowed {
                    let _ignored = sqlx::query("SELECT 1 / 0").execute(&mut *tx).await;
                    return Ok(());
                }
                apply(tx, message).await
            })
        })
    };
    let inbox = env.builder("dlq").max_attempts(3).build().unwrap();
    let running = Running::start(inbox, handler);

    let dead = read_topic(
        &env.dead_letter_topic,
        5,
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .await;
    let good = messages.len() as i64 - 5;
    let pool = env.pool.clone();
    wait_until(
        Duration::from_secs(30),
        "the other messages applied",
        || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM business")
                    .fetch_one(&pool)
                    .await
                    .unwrap()
                    == good
            }
        },
    )
    .await;
    let stats = running.stop().await;

    assert_eq!(dead.len(), 5, "dead letters: {dead:#?}");
    let by_id = |id: Uuid| {
        dead.iter()
            .find(|r| r.headers.get("id") == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("{id} is in the dead-letter topic"))
    };
    let poisoned = by_id(poison.id());
    assert_eq!(poisoned.key.as_deref(), Some("A"));
    assert_eq!(
        poisoned.payload.as_deref(),
        Some(poison.payload().as_slice())
    );
    assert_eq!(
        poisoned.headers["type"], "TestEvent",
        "original headers kept"
    );
    assert_eq!(poisoned.headers[outbox_inbox::ATTEMPTS_HEADER], "3");
    assert!(poisoned.headers[outbox_inbox::ERROR_HEADER].contains("always fails"));
    assert_eq!(poisoned.headers[outbox_inbox::CONSUMER_HEADER], "dlq");
    let rejected_letter = by_id(rejected.id());
    assert_eq!(rejected_letter.headers[outbox_inbox::ATTEMPTS_HEADER], "1");
    assert!(rejected_letter.headers[outbox_inbox::ERROR_HEADER].contains("unknown event type"));
    let swallowed_letter = by_id(swallowed.id());
    assert_eq!(swallowed_letter.headers[outbox_inbox::ATTEMPTS_HEADER], "3");
    assert!(
        swallowed_letter.headers[outbox_inbox::ERROR_HEADER]
            .contains("a statement in its transaction had failed"),
        "{:?}",
        swallowed_letter.headers
    );
    let id_problems: Vec<&String> = dead
        .iter()
        .filter(|r| r.key.as_deref() == Some("N"))
        .map(|r| &r.headers[outbox_inbox::ERROR_HEADER])
        .collect();
    assert_eq!(id_problems.len(), 2);
    assert!(
        id_problems.iter().any(|e| e.contains("no `id` header")),
        "{id_problems:?}"
    );
    assert!(
        id_problems
            .iter()
            .any(|e| e.contains("\"order-42\" is not a UUID")),
        "{id_problems:?}"
    );

    assert_eq!(
        env.inbox_status(poison.id()).await.as_deref(),
        Some("dead_lettered")
    );
    assert_eq!(
        env.inbox_status(rejected.id()).await.as_deref(),
        Some("dead_lettered")
    );
    assert_eq!(stats.dead_lettered(), 5);
    assert_eq!(stats.handler_errors(), 3 + 1 + 3);
    assert_eq!(stats.processed() as i64, good);

    // The poison message was tried three times before its aggregate's next event ran.
    let calls = calls.lock().unwrap().clone();
    let a: Vec<(i32, u32)> = calls
        .iter()
        .filter(|(key, _, _)| key == "A")
        .map(|(_, seq, attempt)| (*seq, *attempt))
        .collect();
    assert_eq!(a, vec![(0, 1), (0, 2), (0, 3), (1, 1), (2, 1)]);
    let rows = env.business_rows().await;
    let applied_a: Vec<i32> = rows
        .iter()
        .filter(|(k, _)| k == "A")
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(applied_a, vec![1, 2]);

    // A replay by a new group does not dead-letter the recorded ones again (the two
    // without an id are, as documented: nothing identifies them).
    let inbox = outbox_inbox::Inbox::builder(
        env.pool.clone(),
        common::brokers(),
        format!("{}-replay", env.group),
        "dlq",
    )
    .topics([env.topic.clone()])
    .build()
    .unwrap();
    let running = Running::start(inbox, business_handler(Duration::ZERO));
    let stats = running.stats.clone();
    let with_id = messages.len() as u64 - 2;
    wait_until(Duration::from_secs(60), "the replay consumed", || {
        let stats = stats.clone();
        async move { stats.duplicates() == with_id && stats.dead_lettered() == 2 }
    })
    .await;
    let stats = running.stop().await;
    assert_eq!(stats.processed(), 0);
    env.cleanup().await;
}

/// 50 aggregates × 40 events with a handler that sleeps 0–2 ms: each aggregate's events
/// are applied in the order produced, and handlers ran concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_aggregate_keeps_its_order_while_aggregates_run_concurrently() {
    const AGGREGATES: usize = 50;
    const EVENTS: i32 = 40;
    let env = TestEnv::new().await;
    // Interleaved, as concurrent writers would produce them.
    let messages: Vec<TestMessage> = (0..EVENTS)
        .flat_map(|seq| (0..AGGREGATES).map(move |a| TestMessage::new(&format!("agg-{a}"), seq)))
        .collect();
    env.produce(&messages).await;

    let running_now = Arc::new(AtomicUsize::new(0));
    let max_seen = Arc::new(AtomicUsize::new(0));
    let handler = {
        let running_now = running_now.clone();
        let max_seen = max_seen.clone();
        handler_fn(move |tx, message| {
            let running_now = running_now.clone();
            let max_seen = max_seen.clone();
            Box::pin(async move {
                let now = running_now.fetch_add(1, Ordering::SeqCst) + 1;
                max_seen.fetch_max(now, Ordering::SeqCst);
                // 0, 1 or 2 ms, varying by message.
                let sleep = Duration::from_millis((message.id().as_u128() % 3) as u64);
                tokio::time::sleep(sleep).await;
                let result = apply(tx, message).await;
                running_now.fetch_sub(1, Ordering::SeqCst);
                result
            })
        })
    };
    let inbox = env.builder("order").max_in_flight(200).build().unwrap();
    let running = Running::start(inbox, handler);
    let total = messages.len() as i64;
    wait_until(Duration::from_secs(120), "2,000 events applied", || {
        let env = &env;
        async move { env.business_count().await >= total }
    })
    .await;
    let stats = running.stop().await;

    assert_eq!(env.business_count().await, total);
    assert_eq!(env.business_distinct().await, total);
    let mut per_aggregate: std::collections::HashMap<String, Vec<i32>> = Default::default();
    for (aggregate, seq) in env.business_rows().await {
        per_aggregate.entry(aggregate).or_default().push(seq);
    }
    assert_eq!(per_aggregate.len(), AGGREGATES);
    let expected: Vec<i32> = (0..EVENTS).collect();
    for (aggregate, seqs) in &per_aggregate {
        assert_eq!(seqs, &expected, "{aggregate} applied out of order");
    }
    let max = max_seen.load(Ordering::SeqCst);
    eprintln!("order: {total} events, max concurrent handlers {max}, stats {stats:?}");
    assert!(max > 1, "handlers never ran concurrently (max {max})");
    env.cleanup().await;
}

/// A second member joins mid-stream and the first one leaves later: every message is
/// applied exactly once across the two, and the revocations committed their finished
/// offsets (the first member's periodic commit is too slow to have done it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalances_neither_lose_nor_repeat_messages() {
    const TOTAL: usize = 3000;
    let env = TestEnv::new().await;
    let messages: Vec<TestMessage> = (0..TOTAL)
        .map(|i| TestMessage::new(&format!("agg-{}", i % 60), (i / 60) as i32))
        .collect();

    // Produce over about six seconds while the members come and go.
    let producing = {
        let topic = env.topic.clone();
        let messages = messages.clone();
        tokio::spawn(async move {
            for batch in messages.chunks(100) {
                common::produce(&topic, batch).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let first = Running::start(
        env.builder("rebalance")
            // Only revocations and shutdown commit within this test's time.
            .commit_interval(Duration::from_secs(600))
            .build()
            .unwrap(),
        business_handler(Duration::from_millis(2)),
    );
    let first_stats = first.stats.clone();
    wait_until(Duration::from_secs(60), "a fifth applied", || {
        let env = &env;
        async move { env.business_count().await >= (TOTAL / 5) as i64 }
    })
    .await;

    // The second member joins: the group splits the partitions between the two.
    let second = Running::start(
        env.builder("rebalance").build().unwrap(),
        business_handler(Duration::from_millis(2)),
    );
    let second_stats = second.stats.clone();
    wait_until(Duration::from_secs(60), "the second member working", || {
        let stats = second_stats.clone();
        async move { stats.processed() > 50 }
    })
    .await;
    let first_at_join = first_stats.processed();
    wait_until(Duration::from_secs(60), "both members working", || {
        let env = &env;
        async move { env.business_count().await >= (TOTAL * 3 / 5) as i64 }
    })
    .await;
    let first_while_shared = first_stats.processed() - first_at_join;

    // The first member leaves: its partitions move to the second.
    let first = first.stop().await;
    wait_until(Duration::from_secs(120), "all messages applied", || {
        let env = &env;
        async move { env.business_count().await >= TOTAL as i64 }
    })
    .await;
    producing.await.unwrap();
    // Nothing more arrives late.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = second.stop().await;

    eprintln!(
        "rebalance: first processed {} ({} while sharing the group), duplicates {}; second processed {}, duplicates {}",
        first.processed(),
        first_while_shared,
        first.duplicates(),
        second.processed(),
        second.duplicates()
    );
    assert_eq!(
        env.business_count().await,
        TOTAL as i64,
        "no message lost or applied twice"
    );
    assert_eq!(env.business_distinct().await, TOTAL as i64);
    assert_eq!(env.inbox_count().await, TOTAL as i64);
    assert_eq!(first.processed() + second.processed(), TOTAL as u64);
    assert!(
        first_while_shared > 0,
        "the first member kept some partitions while the second worked"
    );
    assert!(second.processed() > 0);
    // Had revocations not committed, the second member would replay everything the
    // first one applied before (thousands of duplicates).
    assert!(
        first.duplicates() + second.duplicates() < 100,
        "too many replays: the revocations did not commit their offsets"
    );
    env.cleanup().await;
}

/// A handler that hangs past the revoke timeout is abandoned when its partition is
/// revoked (its transaction, inbox row included, rolls back), and the new owner applies
/// the message; the same on shutdown. Nothing is lost or applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_handlers_are_abandoned_on_revocation_and_shutdown() {
    let env = TestEnv::new().await;
    // In every partition: first a message the first member hangs on, then 50 others
    // (5 keys) that it applies.
    let mut messages = Vec::new();
    for partition in 0..common::PARTITIONS {
        messages.push(TestMessage {
            partition: Some(partition),
            ..TestMessage::new(&format!("stuck-{partition}"), 0)
        });
        for i in 0..50 {
            messages.push(TestMessage {
                partition: Some(partition),
                ..TestMessage::new(&format!("k-{partition}-{}", i % 5), i / 5)
            });
        }
    }
    env.produce(&messages).await;
    let total = messages.len() as i64;
    let stuck = common::PARTITIONS as i64;

    let hanging = handler_fn(|tx, message| {
        Box::pin(async move {
            if message.key_str().unwrap().starts_with("stuck") {
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            apply(tx, message).await
        })
    });
    let first = Running::start(
        env.builder("abandon")
            .revoke_timeout(Duration::from_secs(1))
            .shutdown_timeout(Duration::from_secs(1))
            .build()
            .unwrap(),
        hanging,
    );
    wait_until(
        Duration::from_secs(60),
        "all but the stuck messages applied",
        || {
            let env = &env;
            async move { env.business_count().await == total - stuck }
        },
    )
    .await;

    // The second member joins; the partitions it gets are revoked from the first one,
    // whose hanging handlers there are abandoned after a second.
    let second = Running::start(
        env.builder("abandon").build().unwrap(),
        business_handler(Duration::ZERO),
    );
    wait_until(
        Duration::from_secs(60),
        "the new owner applying the abandoned messages",
        || {
            let env = &env;
            async move { env.business_count().await > total - stuck }
        },
    )
    .await;
    // The first member stops; its remaining hanging handlers are abandoned too.
    let first = first.stop().await;
    wait_until(Duration::from_secs(60), "everything applied", || {
        let env = &env;
        async move { env.business_count().await == total }
    })
    .await;
    let second = second.stop().await;
    eprintln!(
        "abandon: first processed {} (duplicates {}), second processed {} (duplicates {})",
        first.processed(),
        first.duplicates(),
        second.processed(),
        second.duplicates()
    );
    assert_eq!(env.business_count().await, total);
    assert_eq!(env.business_distinct().await, total);
    assert_eq!(env.inbox_count().await, total);
    assert_eq!(
        first.processed() as i64,
        total - stuck,
        "the first member never applied a stuck message"
    );
    assert_eq!(second.processed() as i64, stuck);
    env.cleanup().await;
}

/// Rows older than the retention are deleted, by `purge_expired` and by the running
/// inbox's background purge; other consumers' rows and recent rows stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_inbox_rows() {
    let env = TestEnv::new().await;
    let insert = |consumer: &'static str, age: &'static str, n: i32| {
        let pool = env.pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO outbox_inbox (consumer, event_id, processed_at)
                 SELECT $1, gen_random_uuid(), now() - $2::interval FROM generate_series(1, $3)",
            )
            .bind(consumer)
            .bind(age)
            .bind(n)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    insert("retained", "2 hours", 30).await;
    insert("retained", "10 minutes", 20).await;
    insert("someone-else", "2 hours", 7).await;

    let deleted = outbox_inbox::purge_expired(
        &env.pool,
        &outbox_inbox::default_table(),
        "retained",
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    assert_eq!(deleted, 30);
    assert_eq!(env.inbox_count().await, 27);

    // The background purge of a running inbox: age the recent rows, then wait. The
    // topic keeps messages for at most 40 minutes, so a 1-hour inbox retention is safe.
    set_topic_config(
        &env.topic,
        &[("retention.ms", "1800000"), ("segment.ms", "600000")],
    )
    .await;
    let inbox = env
        .builder("retained")
        .retention(Duration::from_secs(3600))
        .purge_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let running = Running::start(inbox, business_handler(Duration::ZERO));
    sqlx::query(
        "UPDATE outbox_inbox SET processed_at = processed_at - interval '1 hour'
         WHERE consumer = 'retained'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    wait_until(Duration::from_secs(30), "the background purge", || {
        let env = &env;
        async move { env.inbox_count().await == 7 }
    })
    .await;
    running.stop().await;
    let left: Vec<String> = sqlx::query_scalar("SELECT DISTINCT consumer FROM outbox_inbox")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(left, vec!["someone-else".to_string()]);
    env.cleanup().await;
}

/// Start-up problems are errors that name the fix: a missing dead-letter topic, a
/// missing inbox table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_dead_letter_topic_or_table_fails_at_start() {
    let env = TestEnv::new().await;
    let inbox = env
        .builder("start")
        .dead_letter_topic("{topic}.missing")
        .create_dead_letter_topics(false)
        .build()
        .unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        inbox.run(business_handler(Duration::ZERO), Default::default()),
    )
    .await
    .expect("fails fast");
    let err = result.unwrap_err();
    // What `main() -> Result<(), Box<dyn Error>>` prints: the message and its hint.
    let shown = format!("{:?}", Box::<dyn std::error::Error>::from(err));
    assert!(
        shown.contains(&format!("{}.missing", env.topic))
            && shown.contains("does not exist")
            && shown.contains("create_dead_letter_topics"),
        "{shown}"
    );

    let inbox = env
        .builder("start")
        .table(outbox_inbox::TableRef::new("public", "no_such_inbox").unwrap())
        .build()
        .unwrap();
    let err = inbox
        .run(business_handler(Duration::ZERO), Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no_such_inbox") && err.contains("migrate"),
        "{err}"
    );
    env.cleanup().await;
}

/// A missing dead-letter topic is created at start with its source topic's partitions,
/// and dead letters land in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_dead_letter_topics_are_created_like_their_source() {
    let env = TestEnv::new().await;
    let poison = TestMessage::new("P", 0);
    env.produce(std::slice::from_ref(&poison)).await;
    let inbox = env
        .builder("autodlq")
        .dead_letter_topic("{topic}.auto")
        .max_attempts(1)
        .build()
        .unwrap();
    let handler = handler_fn(|_tx, _message: &InboxMessage| {
        Box::pin(async move { Err(HandlerError::permanent("always refused")) })
    });
    let running = Running::start(inbox, handler);
    let stats = running.stats.clone();
    wait_until(
        Duration::from_secs(60),
        "the poison message dead-lettered",
        || {
            let stats = stats.clone();
            async move { stats.dead_lettered() == 1 }
        },
    )
    .await;
    running.stop().await;
    let dead_letters = format!("{}.auto", env.topic);
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(&dead_letters), Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        metadata.topics()[0].partitions().len() as i32,
        PARTITIONS,
        "as many partitions as the source topic"
    );
    let received = read_topic(
        &dead_letters,
        1,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(received.len(), 1);
    delete_topics(&[&dead_letters]).await;
    env.cleanup().await;
}

/// Settings that would break the guarantees are refused with a message naming them.
#[tokio::test]
async fn bad_settings_are_refused_with_the_fix() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://localhost/x")
        .unwrap();
    let err = outbox_inbox::Inbox::builder(pool.clone(), "127.0.0.1:9092", "g", "c")
        .topics(["t"])
        .kafka_property("enable.auto.commit", "true")
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("enable.auto.commit") && err.contains("remove it"),
        "{err}"
    );
    let err = outbox_inbox::Inbox::builder(pool, "127.0.0.1:9092", "g", "c")
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains(".topics("), "{err}");
}

/// An inbox retention shorter than the topics may keep a message (retention.ms +
/// segment.ms) would let a replay after an offset reset apply events twice: refused at
/// start, naming the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_shorter_than_the_topics_is_refused() {
    let env = TestEnv::new().await;
    let inbox = env
        .builder("short")
        .retention(Duration::from_secs(3600))
        .build()
        .unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        inbox.run(business_handler(Duration::ZERO), Default::default()),
    )
    .await
    .expect("the inbox stops by itself");
    let err = result
        .expect_err("a too short retention is refused")
        .to_string();
    assert!(
        err.contains("shorter than the topics") && err.contains("retention()"),
        "{err}"
    );
    env.cleanup().await;
}

/// Unset, the retention follows the topics: rows 8 days old are kept while the topic
/// (Kafka's default 7 days plus a 7-day segment) may still deliver their messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_follows_the_topics_by_default() {
    let env = TestEnv::new().await;
    sqlx::query(
        "INSERT INTO outbox_inbox (consumer, event_id, processed_at)
         SELECT 'follows', gen_random_uuid(), now() - interval '8 days'
         FROM generate_series(1, 10)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let inbox = env
        .builder("follows")
        .purge_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let running = Running::start(inbox, business_handler(Duration::ZERO));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = env.inbox_count().await;
    running.stop().await;
    assert_eq!(kept, 10, "rows the topic may still redeliver are kept");
    env.cleanup().await;
}

/// A topic deleted and re-created under a running inbox starts its offsets over. The
/// new messages are applied, not taken for the old ones that had those offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_is_consumed_from_its_new_start() {
    let env = TestEnv::new().await;
    let first: Vec<TestMessage> = (0..30)
        .map(|n| TestMessage::new(&format!("a-{}", n % 3), n))
        .collect();
    env.produce(&first).await;
    let inbox = env.builder("recreated").build().unwrap();
    let running = Running::start(inbox, business_handler(Duration::ZERO));
    let stats = running.stats.clone();
    let consumed = |n: u64| {
        let stats = stats.clone();
        move || {
            let stats = stats.clone();
            async move { stats.processed() == n }
        }
    };
    wait_until(
        Duration::from_secs(60),
        "the first 30 applied",
        consumed(30),
    )
    .await;

    common::delete_topics(&[&env.topic]).await;
    // Deletion completes in the background: create again until the broker accepts it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !common::try_create_topic(&env.topic).await {
        assert!(
            std::time::Instant::now() < deadline,
            "could not re-create the topic"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let second: Vec<TestMessage> = (0..5).map(|n| TestMessage::new("b", 100 + n)).collect();
    env.produce(&second).await;
    wait_until(
        Duration::from_secs(120),
        "the re-created topic's 5 messages applied",
        consumed(35),
    )
    .await;
    running.stop().await;
    assert_eq!(env.business_count().await, 35);
    env.cleanup().await;
}

/// `inbox.migrate()` at every start logs nothing when the table exists: none of
/// PostgreSQL's "already exists, skipping" notices reach the application's log.
#[tokio::test]
async fn migrating_an_existing_inbox_table_logs_no_notices() {
    let env = TestEnv::new().await;
    let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let writer = SharedBuffer(logs.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let inbox = env.builder("notices").build().unwrap();
    inbox.migrate().await.unwrap();
    drop(guard);
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(!text.contains("already exists"), "{text}");
    env.cleanup().await;
}

#[derive(Clone)]
struct SharedBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
