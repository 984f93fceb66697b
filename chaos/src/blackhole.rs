//! A true black hole between one relay and PostgreSQL, made with nftables: every packet
//! the relay's process sends to the server's port is dropped, silently. Its connections
//! stay open on both ends (half-open), nothing answers the server's keepalive probes
//! or acknowledges its data, and new connections never complete, as when the relay's
//! host falls off the network. Toxiproxy cannot make this: its own TCP stack answers
//! the server's keepalive probes.
//!
//! The relay to cut off runs as its own user ([`UID`]); the rule matches the sending
//! socket's owner (`meta skuid`), so the standby, the writers and the server itself
//! are untouched. Loopback only: the rule names the server's loopback port.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The user the cut-off relay runs as (`nobody` on Debian).
pub const UID: u32 = 65534;
/// Its group (`nogroup`).
pub const GID: u32 = 65534;

/// The nftables table holding the rule; deleting it heals the network.
const TABLE: &str = "outbox_chaos";

/// An active black hole; [`Blackhole::heal`] (or dropping it) removes it.
pub struct Blackhole {
    active: bool,
}

impl Blackhole {
    /// Drops every packet that processes of [`UID`] send to `port` on loopback.
    pub fn open(port: u16) -> Result<Blackhole> {
        // A table left by an interrupted run would drop the next run's packets too.
        remove_table();
        nft(&format!(
            "table inet {TABLE} {{
               chain output {{
                 type filter hook output priority 0; policy accept;
                 oifname \"lo\" meta skuid {UID} tcp dport {port} drop
               }}
             }}"
        ))?;
        Ok(Blackhole { active: true })
    }

    pub fn heal(mut self) {
        self.active = false;
        remove_table();
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if self.active {
            remove_table();
        }
    }
}

fn remove_table() {
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", TABLE])
        .stderr(Stdio::null())
        .status();
}

fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (nftables; scripts/setup installs it)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "nft refused the black-hole rule ({}); the scenario needs root (CAP_NET_ADMIN) and nftables",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
