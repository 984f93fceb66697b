//! A consumer process killed with SIGKILL between its database commits and its offset
//! commit: the restarted consumer replays those messages and the inbox drops them.
//!
//! The consumer process is this very test binary, started again to run only
//! `inbox_consumer_process` (ignored in a normal run), with its settings in
//! the environment.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{business_handler, wait_until, TestEnv, TestMessage};
use outbox_inbox::Inbox;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const CHILD_ENV: &str = "OUTBOX_INBOX_TEST_CHILD";
const STATS_PREFIX: &str = "inbox-stats";

/// The consumer process: runs an inbox until SIGTERM, then prints its counters.
#[test]
#[ignore = "the consumer process of killed_consumer_replays_into_the_inbox, which starts it"]
fn inbox_consumer_process() {
    let Ok(database_url) = std::env::var(CHILD_ENV) else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let topic = var("INBOX_TEST_TOPIC");
    let group = var("INBOX_TEST_GROUP");
    let commit_ms: u64 = var("INBOX_TEST_COMMIT_MS").parse().unwrap();
    let delay_ms: u64 = var("INBOX_TEST_DELAY_MS").parse().unwrap();
    common::init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(10)
            .connect(&database_url)
            .await
            .unwrap();
        let builder = Inbox::builder(pool, common::brokers(), group, "crash-test")
            .topics([topic])
            .commit_interval(Duration::from_millis(commit_ms));
        let inbox = match std::env::var("INBOX_TEST_INSTANCE") {
            // A static member keeps the default session timeout (45 s): its restart
            // must not wait for it.
            Ok(instance) => builder.static_member(instance),
            Err(_) => builder.consumer_property("session.timeout.ms", "6000"),
        }
        .build()
        .unwrap();
        let stats = inbox.stats();
        let shutdown = CancellationToken::new();
        let on_sigterm = shutdown.clone();
        tokio::spawn(async move {
            let mut sigterm =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            sigterm.recv().await;
            on_sigterm.cancel();
        });
        inbox
            .run(business_handler(Duration::from_millis(delay_ms)), shutdown)
            .await
            .unwrap();
        println!(
            "{STATS_PREFIX} processed={} duplicates={}",
            stats.processed(),
            stats.duplicates()
        );
    });
}

fn start_consumer(env: &TestEnv, commit_ms: u64, delay_ms: u64) -> Child {
    start_consumer_as(env, commit_ms, delay_ms, None)
}

fn start_consumer_as(
    env: &TestEnv,
    commit_ms: u64,
    delay_ms: u64,
    instance: Option<&str>,
) -> Child {
    let mut command = Command::new(std::env::current_exe().unwrap());
    if let Some(instance) = instance {
        command.env("INBOX_TEST_INSTANCE", instance);
    }
    command
        .args([
            "inbox_consumer_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, &env.url)
        .env("INBOX_TEST_TOPIC", &env.topic)
        .env("INBOX_TEST_GROUP", &env.group)
        .env("INBOX_TEST_COMMIT_MS", commit_ms.to_string())
        .env("INBOX_TEST_DELAY_MS", delay_ms.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the test binary starts again as a consumer")
}

/// What a kill-and-restart run observed.
struct Outcome {
    applied_at_kill: i64,
    /// Handlers committed by the restarted consumer.
    processed: i64,
    /// Messages the restarted consumer dropped as already in the inbox.
    duplicates: i64,
}

const N: i64 = 2000;

/// Produces N messages (50 aggregates), runs a consumer that commits offsets every
/// `commit_ms`, SIGKILLs it mid-stream, runs another one until all N are applied,
/// stops it with SIGTERM, and checks that each message was applied exactly once.
async fn kill_and_restart(commit_ms: u64) -> Outcome {
    let env = TestEnv::new().await;
    let messages: Vec<TestMessage> = (0..N)
        .map(|i| TestMessage::new(&format!("agg-{}", i % 50), (i / 50) as i32))
        .collect();
    env.produce(&messages).await;

    // 10 ms per handler keeps it busy for a while, with hundreds of messages queued in
    // its lanes at any time.
    let mut first = start_consumer(&env, commit_ms, 10);
    wait_until(
        Duration::from_secs(90),
        "the first consumer applying",
        || {
            let env = &env;
            async move { env.business_count().await >= 300 }
        },
    )
    .await;
    first.start_kill().expect("SIGKILL");
    let status = first.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited: {status:?}");
    // Let PostgreSQL notice the dead connections (their open transactions roll back).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let applied_at_kill = env.business_count().await;
    assert!(
        applied_at_kill > 0 && applied_at_kill < N,
        "killed mid-stream ({applied_at_kill} of {N} applied)"
    );
    assert_eq!(
        env.inbox_count().await,
        applied_at_kill,
        "inbox rows and business rows commit together"
    );

    let second = start_consumer(&env, 1000, 0);
    let pid = second.id().expect("running") as i32;
    wait_until(Duration::from_secs(120), "all messages applied", || {
        let env = &env;
        async move { env.business_count().await >= N }
    })
    .await;
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let output = tokio::time::timeout(Duration::from_secs(60), second.wait_with_output())
        .await
        .expect("the consumer stops within 60 s of SIGTERM")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "clean exit on SIGTERM: {stdout}");
    // libtest may have printed "test inbox_consumer_process ... " on the same line.
    let stats_line = stdout
        .lines()
        .find_map(|line| line.find(STATS_PREFIX).map(|at| &line[at..]))
        .unwrap_or_else(|| panic!("no stats line in: {stdout}"));
    let field = |name: &str| -> i64 {
        stats_line
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    let outcome = Outcome {
        applied_at_kill,
        processed: field("processed"),
        duplicates: field("duplicates"),
    };
    eprintln!(
        "crash (offset commits every {commit_ms} ms): {} of {N} applied when killed; the restarted consumer processed {} and dropped {} duplicates",
        outcome.applied_at_kill, outcome.processed, outcome.duplicates
    );

    assert_eq!(
        env.business_count().await,
        N,
        "each message applied exactly once"
    );
    assert_eq!(env.business_distinct().await, N);
    assert_eq!(env.inbox_count().await, N);
    assert_eq!(outcome.processed, N - applied_at_kill);
    env.cleanup().await;
    outcome
}

/// Killed between its database commits and its (first) offset commit: the restart
/// replays everything the first consumer applied, and the inbox drops each of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_replays_into_the_inbox() {
    let outcome = kill_and_restart(600_000).await;
    assert_eq!(
        outcome.duplicates, outcome.applied_at_kill,
        "no offset was committed before the kill, so every applied message came back and was dropped"
    );
}

/// Offsets committed every 100 ms while hundreds of messages wait in the lanes: a
/// commit never passes an unfinished message, so the kill loses nothing, and the
/// restart replays only what was applied after the last commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_with_frequent_commits_loses_nothing() {
    let outcome = kill_and_restart(100).await;
    assert!(
        outcome.duplicates < outcome.applied_at_kill,
        "offsets were committed before the kill ({} duplicates of {} applied)",
        outcome.duplicates,
        outcome.applied_at_kill
    );
}

/// A static member (`static_member`) restarted after SIGKILL takes its partitions back
/// at once: with the default 45 s session timeout, the new process applies messages
/// well before the dead member's session could have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_static_member_resumes_without_waiting_for_the_session_timeout() {
    let env = TestEnv::new().await;
    let messages: Vec<TestMessage> = (0..N)
        .map(|i| TestMessage::new(&format!("agg-{}", i % 50), (i / 50) as i32))
        .collect();
    env.produce(&messages).await;
    let mut first = start_consumer_as(&env, 200, 10, Some("member-1"));
    wait_until(
        Duration::from_secs(90),
        "the first consumer applying",
        || {
            let env = &env;
            async move { env.business_count().await >= 300 }
        },
    )
    .await;
    first.start_kill().expect("SIGKILL");
    let _ = first.wait().await;
    let applied_at_kill = env.business_count().await;
    let restarted = std::time::Instant::now();
    let second = start_consumer_as(&env, 200, 0, Some("member-1"));
    wait_until(Duration::from_secs(120), "all messages applied", || {
        let env = &env;
        async move { env.business_count().await >= N }
    })
    .await;
    let resumed = restarted.elapsed();
    eprintln!("static member: {applied_at_kill} applied at the kill; the restart applied the rest within {resumed:?}");
    assert!(
        resumed < Duration::from_secs(30),
        "the restarted static member waited {resumed:?}, as if for the 45 s session timeout"
    );
    assert_eq!(env.business_distinct().await, N);
    drop(second);
    env.cleanup().await;
}
