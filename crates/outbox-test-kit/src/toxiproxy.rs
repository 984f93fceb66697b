//! A client of Toxiproxy's HTTP API (loopback only): proxies between the relay and
//! PostgreSQL or Kafka, and the faults ("toxics") put on them.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Toxiproxy's API, as `scripts/services start toxiproxy` runs it.
pub const API: &str = "http://127.0.0.1:8474";

#[derive(Clone)]
pub struct Toxiproxy {
    http: reqwest::Client,
}

/// Which way a toxic acts: on what the client sends, or on what it receives.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Upstream,
    Downstream,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Upstream => "upstream",
            Stream::Downstream => "downstream",
        }
    }
}

/// A fault, as Toxiproxy's toxic types define them.
#[derive(Debug, Clone, Copy)]
pub enum Toxic {
    /// Each chunk delayed by `latency_ms` ± `jitter_ms`.
    Latency { latency_ms: u64, jitter_ms: u64 },
    /// At most `kb_per_s` kilobytes per second.
    Bandwidth { kb_per_s: u64 },
    /// Connections reset (TCP RST) at once, and new ones as they come.
    ResetPeer,
    /// Nothing gets through and connections stay open: a black hole, as a network
    /// partition looks to both ends.
    Blackhole,
    /// Nothing gets through, and the connections are closed after `timeout_ms`.
    Cut { timeout_ms: u64 },
}

impl Toxic {
    fn body(self, name: &str, stream: Stream) -> Value {
        let (kind, attributes) = match self {
            Toxic::Latency {
                latency_ms,
                jitter_ms,
            } => (
                "latency",
                json!({"latency": latency_ms, "jitter": jitter_ms}),
            ),
            Toxic::Bandwidth { kb_per_s } => ("bandwidth", json!({"rate": kb_per_s})),
            Toxic::ResetPeer => ("reset_peer", json!({"timeout": 0})),
            // timeout = 0: drop the data and never close the connection.
            Toxic::Blackhole => ("timeout", json!({"timeout": 0})),
            Toxic::Cut { timeout_ms } => ("timeout", json!({"timeout": timeout_ms})),
        };
        json!({
            "name": name,
            "type": kind,
            "stream": stream.name(),
            "toxicity": 1.0,
            "attributes": attributes,
        })
    }
}

impl Default for Toxiproxy {
    fn default() -> Self {
        Self::new()
    }
}

impl Toxiproxy {
    pub fn new() -> Self {
        Toxiproxy {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Checks that the API answers.
    pub async fn check(&self) -> Result<()> {
        self.http
            .get(format!("{API}/version"))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .context("Toxiproxy does not answer on 127.0.0.1:8474; start it with `scripts/services start toxiproxy`")?;
        Ok(())
    }

    /// (Re)creates proxy `name` from `listen` to `upstream`, both loopback addresses,
    /// without toxics.
    pub async fn proxy(&self, name: &str, listen: &str, upstream: &str) -> Result<()> {
        for address in [listen, upstream] {
            if !address.starts_with("127.0.0.1:") {
                bail!("fault proxies only run between loopback addresses, not {address}");
            }
        }
        self.delete(name).await?;
        let response = self
            .http
            .post(format!("{API}/proxies"))
            .json(&json!({"name": name, "listen": listen, "upstream": upstream, "enabled": true}))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!(
                "creating proxy {name}: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Removes proxy `name` (and closes its connections), if it exists.
    pub async fn delete(&self, name: &str) -> Result<()> {
        self.http
            .delete(format!("{API}/proxies/{name}"))
            .send()
            .await?;
        Ok(())
    }

    /// Points proxy `name` at another upstream (a promoted standby, as a DNS name or a
    /// virtual IP would be switched); its open connections are closed.
    pub async fn set_upstream(&self, name: &str, upstream: &str) -> Result<()> {
        if !upstream.starts_with("127.0.0.1:") {
            bail!("fault proxies only run between loopback addresses, not {upstream}");
        }
        let response = self
            .http
            .post(format!("{API}/proxies/{name}"))
            .json(&json!({"upstream": upstream}))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!(
                "pointing proxy {name} at {upstream}: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Puts `toxic` on both directions of proxy `proxy`.
    pub async fn add(&self, proxy: &str, toxic: Toxic) -> Result<()> {
        for stream in [Stream::Upstream, Stream::Downstream] {
            let name = format!("{}_{}", proxy, stream.name());
            let response = self
                .http
                .post(format!("{API}/proxies/{proxy}/toxics"))
                .json(&toxic.body(&name, stream))
                .send()
                .await?;
            if !response.status().is_success() {
                bail!(
                    "adding {toxic:?} to {proxy}: {} {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    /// Removes the toxics of [`Toxiproxy::add`] from proxy `proxy`.
    pub async fn clear(&self, proxy: &str) -> Result<()> {
        for stream in [Stream::Upstream, Stream::Downstream] {
            let name = format!("{}_{}", proxy, stream.name());
            self.http
                .delete(format!("{API}/proxies/{proxy}/toxics/{name}"))
                .send()
                .await?;
        }
        Ok(())
    }
}
