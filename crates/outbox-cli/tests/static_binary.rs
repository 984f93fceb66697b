//! The statically linked release binary (`scripts/build-static`, x86_64 musl, stripped): it has
//! no interpreter and needs no shared library, and it does the job: in both modes it
//! publishes to the real Kafka, over the network stack and TLS code it carries itself.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Builds it once per test binary (a release build: minutes the first time).
fn static_binary() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = Command::new(repo_root().join("scripts/build-static"))
                .stdout(Stdio::null())
                .status()
                .expect("scripts/build-static starts");
            assert!(status.success(), "scripts/build-static failed");
            repo_root().join("target/static/outbox")
        })
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_binary_has_no_dynamic_dependencies_and_publishes_in_both_modes() {
    let binary = static_binary();
    let header = Command::new("readelf")
        .args(["-l", "-d"])
        .arg(&binary)
        .output()
        .unwrap();
    let header = String::from_utf8_lossy(&header.stdout);
    assert!(
        !header.contains("INTERP") && !header.contains("NEEDED"),
        "{header}"
    );
    for mode in [Mode::Polling, Mode::Cdc] {
        let db = TestDb::for_mode(mode).await;
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("relay.log");
        let mut relay = relay_command(&binary, &db.url, &db.template, &log_path)
            .env("OUTBOX_MODE", mode_name(mode))
            .spawn()
            .unwrap();
        let events: Vec<_> = (0..200)
            .map(|n| event("order", &(n % 7).to_string(), n))
            .collect();
        db.write(&events).await;
        let ids: Vec<_> = events.iter().map(|e| e.id).collect();
        let received =
            consume_ids_or_partial(vec![db.topic("order")], &ids, Duration::from_secs(60)).await;
        sigterm(&relay);
        let status = relay.wait().unwrap();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let audit = audit(&db.rows().await, &received);
        assert!(
            audit.missing.is_empty(),
            "{mode:?}: {} of 200 events never arrived; relay log:\n{log}",
            audit.missing.len()
        );
        audit.assert_complete_and_ordered();
        assert!(
            status.success(),
            "{mode:?}: the relay exited with {status}:\n{log}"
        );
        db.drop_db().await;
    }
}
