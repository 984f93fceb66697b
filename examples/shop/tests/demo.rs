//! `scripts/demo` as a newcomer runs it, once per sink: every run must end with the
//! three report lines at `lost=0` and the closing line. The runs share the demo's
//! databases and ports, so they go one after another.

use std::process::Command;

#[test]
fn the_demo_loses_nothing_on_every_sink() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/demo");
    for sink in ["kafka", "nats", "rabbitmq", "webhook"] {
        let output = Command::new(script)
            .args(["--sink", sink])
            .output()
            .expect("scripts/demo runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "scripts/demo --sink {sink} failed ({:?}):\n{stdout}\n{stderr}",
            output.status
        );
        let reports: Vec<&str> = stdout
            .lines()
            .filter(|line| {
                ["orders=", "users=", "inventory_updates="]
                    .iter()
                    .any(|start| line.starts_with(start))
            })
            .collect();
        assert_eq!(reports.len(), 3, "--sink {sink}: {stdout}");
        for line in &reports {
            assert!(line.contains(" lost=0"), "--sink {sink}: {line}\n{stdout}");
        }
        assert!(
            stdout.contains("demo: every event published, each applied exactly once"),
            "--sink {sink}: {stdout}"
        );
    }
}
