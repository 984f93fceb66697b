//! `--profile-relay`: a CPU profile of our relay while it drains its backlog (its own
//! ceiling, where its CPU time is), recorded with `perf` and drawn as a flame graph with
//! inferno, next to the report.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use inferno::collapse::perf::Folder;
use inferno::collapse::Collapse;

/// Samples per second: enough for a drain of a few seconds, few enough that unwinding
/// the stacks afterwards takes seconds too.
const FREQUENCY: &str = "199";

/// A `perf record` of one process, running.
pub struct Recording {
    perf: Child,
    data: PathBuf,
    svg: PathBuf,
}

/// Starts recording `pid`. Stacks are unwound from DWARF call-frame information, since
/// release builds keep no frame pointers.
pub fn start(pid: u32, dir: &Path, name: &str) -> Result<Recording> {
    let data = dir.join(format!("{name}.perf.data"));
    let perf = Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            FREQUENCY,
            "--call-graph",
            "dwarf,16384",
            "-p",
        ])
        .arg(pid.to_string())
        .arg("-o")
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting perf (scripts/setup installs it: linux-perf)")?;
    Ok(Recording {
        perf,
        data,
        svg: dir.join(format!("{name}.flamegraph.svg")),
    })
}

impl Recording {
    /// Stops the recording and writes the flame graph; returns its path.
    pub fn finish(mut self) -> Result<PathBuf> {
        // perf writes its data out on SIGINT, then ends by the same signal.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        let status = self.perf.wait()?;
        if !status.success() && status.signal() != Some(libc::SIGINT) {
            bail!("perf record ended with {status}");
        }
        // --no-inline: resolving inlined frames with addr2line takes minutes.
        let script = Command::new("perf")
            .args(["script", "--no-inline", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("running perf script")?;
        if !script.status.success() {
            bail!("perf script ended with {}", script.status);
        }
        let mut folded = Vec::new();
        Folder::default()
            .collapse(&script.stdout[..], &mut folded)
            .context("folding the stacks")?;
        let mut options = inferno::flamegraph::Options::default();
        options.title = "outbox relay draining its backlog".into();
        let svg = std::fs::File::create(&self.svg)
            .with_context(|| format!("creating {}", self.svg.display()))?;
        inferno::flamegraph::from_reader(&mut options, &folded[..], svg)
            .context("drawing the flame graph")?;
        // The raw data is large and the flame graph says what it says.
        let _ = std::fs::remove_file(&self.data);
        Ok(self.svg)
    }
}
