//! What `deploy/` holds, checked with the tool made for each (scripts/setup installs
//! them): the alert rules and their unit tests with promtool, the dashboard's queries
//! as PromQL, the metric names of both against what the relay exports, the systemd unit
//! with systemd-analyze (and its man page reference with the man pages the binary
//! writes), the Kubernetes manifests by strict decoding into the API types, the
//! Containerfile with dockerfile-utils, and the shell completions.
//!
//! Not run here: a container engine, a cluster, systemd as PID 1. The README says so.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::repo_root;

fn deploy() -> PathBuf {
    repo_root().join("deploy")
}

/// Runs `command`, asserts it succeeded, and returns its output (stdout, then stderr).
fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{command:?} did not start ({err}); run scripts/setup"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{command:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = deploy().join("prometheus");
    let checked = run(Command::new("promtool")
        .args(["check", "rules", "outbox-alerts.yml"])
        .current_dir(&dir));
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    let tested = run(Command::new("promtool")
        .args(["test", "rules", "outbox-alerts.test.yml"])
        .current_dir(&dir));
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every query of the dashboard, with its variables filled in.
fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(deploy().join("grafana/outbox-relay.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    let mut queries = Vec::new();
    for panel in panels {
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} does not use the datasource variable",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        for target in targets {
            queries.push(
                target["expr"]
                    .as_str()
                    .expect("a PromQL expression")
                    .replace("$__rate_interval", "1m")
                    .replace("$job", ".*"),
            );
        }
    }
    queries
}

#[test]
fn dashboard_queries_parse_as_promql() {
    let queries = dashboard_queries();
    // promtool parses the expressions of recording rules: one per query.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, query) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(query).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, rules).unwrap();
    let checked = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path));
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}"
    );
}

/// The `outbox_*` metric names in `text`, histogram series folded into their metric.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("outbox_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| outbox_relay::metrics::ALL.contains(base))
            })
            .unwrap_or(&name);
        names.insert(base.to_string());
    }
    names
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics_and_the_dashboard_shows_all() {
    let exported: BTreeSet<String> = outbox_relay::metrics::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    let alerts = std::fs::read_to_string(deploy().join("prometheus/outbox-alerts.yml")).unwrap();
    let dashboard = dashboard_queries().join("\n");
    for (file, names) in [
        ("outbox-alerts.yml", metric_names(&alerts)),
        ("outbox-relay.json", metric_names(&dashboard)),
    ] {
        let unknown: Vec<_> = names.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the relay does not export: {unknown:?}"
        );
    }
    let shown = metric_names(&dashboard);
    let missing: Vec<_> = exported.difference(&shown).collect();
    assert!(
        missing.is_empty(),
        "the dashboard shows no panel of {missing:?}"
    );
}

/// `outbox man --dir DIR/man1`; returns DIR (a MANPATH).
fn man_pages(dir: &Path) -> PathBuf {
    let man1 = dir.join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    run(Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["man", "--dir"])
        .arg(&man1));
    dir.join("man")
}

#[test]
fn man_pages_cover_every_command_and_render_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let manpath = man_pages(dir.path());
    for page in [
        "outbox.1",
        "outbox-migrate.1",
        "outbox-relay.1",
        "outbox-status.1",
        "outbox-dead-letters.1",
        "outbox-verify.1",
    ] {
        let path = manpath.join("man1").join(page);
        assert!(path.exists(), "{page} was not written");
        let rendered = run(Command::new("groff")
            .args(["-man", "-Tutf8", "-ww"])
            .arg(&path));
        assert!(
            !rendered.contains("warning"),
            "{page} renders with warnings:\n{rendered}"
        );
    }
    let relay = std::fs::read_to_string(manpath.join("man1/outbox-relay.1")).unwrap();
    assert!(relay.contains("http\\-listen"), "{relay}");
    // Printed whole on standard output too.
    let page = run(Command::new(env!("CARGO_BIN_EXE_outbox")).arg("man"));
    assert!(
        page.starts_with(".ie") || page.contains(".TH outbox 1"),
        "{page}"
    );
}

#[test]
fn bash_completion_completes_subcommands_and_flags() {
    let script = run(Command::new(env!("CARGO_BIN_EXE_outbox")).args(["completions", "bash"]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.bash");
    std::fs::write(&path, script).unwrap();
    // What bash offers after `outbox re` and after `outbox relay --`.
    let complete = |words: &str| {
        let line = format!(
            "source {path}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMP_LINE=\"{words}\"; COMP_POINT=${{#COMP_LINE}}; _outbox outbox; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            path = path.display()
        );
        run(Command::new("bash").args(["-c", &line]))
    };
    let subcommands = complete("outbox re");
    assert!(subcommands.lines().any(|l| l == "relay"), "{subcommands}");
    let flags = complete("outbox relay --");
    assert!(
        flags.lines().any(|l| l == "--mode") && flags.lines().any(|l| l == "--http-listen"),
        "{flags}"
    );
    for shell in ["zsh", "fish"] {
        let script = run(Command::new(env!("CARGO_BIN_EXE_outbox")).args(["completions", shell]));
        assert!(script.contains("dead-letters"), "{shell}: {script}");
    }
}

#[test]
fn systemd_unit_verifies_and_its_hardening_rates_ok() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(deploy().join("systemd/outbox-relay.service"))
        .unwrap()
        .replace("/usr/local/bin/outbox", env!("CARGO_BIN_EXE_outbox"));
    let path = dir.path().join("outbox-relay.service");
    std::fs::write(&path, unit).unwrap();
    // `Documentation=man:outbox(1)` is looked up: with the binary's own pages.
    let manpath = man_pages(dir.path());
    let verified = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .env("MANPATH", &manpath));
    assert!(verified.trim().is_empty(), "{verified}");
    let security = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path));
    let exposure: f64 = security
        .lines()
        .find_map(|l| l.split("outbox-relay.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{security}"));
    assert!(
        exposure <= 2.0,
        "exposure {exposure} (0 is the most restricted, 10 the least):\n{security}"
    );
}

#[test]
fn kubernetes_manifests_decode_strictly_and_carry_what_the_relay_needs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outbox.toml");
    let validated = run(Command::new("go")
        .args(["run", ".", "-config-out"])
        .arg(&config)
        .arg(deploy().join("kubernetes/outbox-relay.yaml"))
        .current_dir(deploy().join("kubernetes/validate")));
    assert!(
        validated.contains("objects decoded strictly"),
        "{validated}"
    );
    // The ConfigMap's outbox.toml is one the relay loads (the URL comes from the
    // Secret's file, as OUTBOX_DATABASE_URL_FILE says).
    let loaded = outbox_relay::Config::load_file_only(
        &config,
        &outbox_relay::ConfigOverrides {
            database_url: Some("postgres://outbox_relay@postgres:5432/app".into()),
            ..Default::default()
        },
    )
    .and_then(|c| c.resolve());
    assert!(loaded.is_ok(), "{:?}", loaded.err());

    // A misspelled field is refused: the check can fail.
    let manifest = std::fs::read_to_string(deploy().join("kubernetes/outbox-relay.yaml"))
        .unwrap()
        .replace("readinessProbe:", "readinesProbe:");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, manifest).unwrap();
    let output = Command::new("go")
        .args(["run", "."])
        .arg(&broken)
        .current_dir(deploy().join("kubernetes/validate"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && text.contains("readinesProbe"),
        "{text}"
    );
}

#[test]
fn containerfile_lints_clean() {
    let linted = run(Command::new("npx")
        .args(["--yes", "dockerfile-utils@0.16.3", "lint"])
        .arg(deploy().join("Containerfile")));
    assert!(linted.trim().is_empty(), "{linted}");
    let containerfile = std::fs::read_to_string(deploy().join("Containerfile")).unwrap();
    let last_stage = containerfile.rsplit("\nFROM ").next().unwrap();
    assert!(
        last_stage.starts_with("scratch"),
        "the image is not built on scratch"
    );
    assert!(
        last_stage.contains("\nUSER 65532"),
        "the image runs as root"
    );
}
