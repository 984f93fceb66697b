//! The outbox relay as a library: `run(config, shutdown)` publishes an outbox table to
//! its sink (Kafka, NATS JetStream, RabbitMQ, webhooks) until `shutdown` is cancelled, then drains what is in flight and returns.
//!
//! - [`config`]: settings from a TOML file, `OUTBOX_*` variables and flags, validated
//!   into a [`RelayConfig`].
//! - [`engine`]: leadership (one active relay per table) and the loop over a source
//!   (`source.rs`: polling; [`cdc`]: the replication stream) and the sink ([`sinks`]);
//!   `pipeline.rs`: polling's loop, which fetches and records while it publishes.
//! - [`metrics`] and the HTTP endpoint (`/metrics`, `/healthz`).

/// Crash points: with the `failpoints` feature (test builds only) and
/// `FAILPOINTS=<name>=return`, the process exits with [`failpoints::EXIT_CODE`] at that
/// point, as a crash there would leave things. Without the feature it is nothing.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        if fail::eval($name, |_| ()).is_some() {
            tracing::warn!(failpoint = $name, "failpoint reached: exiting");
            std::process::exit($crate::failpoints::EXIT_CODE);
        }
    };
}

pub mod failpoints {
    //! The crash points of the relay, for the fault tests: `relay-published-not-recorded`
    //! (every event of a batch acknowledged, nothing recorded or confirmed yet),
    //! `relay-recorded` (recorded, or in CDC confirmed but perhaps not yet reported to
    //! the server) and `relay-dead-letter-write` (a dead letter about to be stored).

    /// The exit code of a process stopped at a crash point.
    pub const EXIT_CODE: i32 = 86;

    /// Reads `FAILPOINTS` (test builds only); keep the returned guard for the life of
    /// the process.
    #[cfg(feature = "failpoints")]
    pub fn setup() -> Option<fail::FailScenario<'static>> {
        Some(fail::FailScenario::setup())
    }

    /// Reads nothing: this build has no crash points.
    #[cfg(not(feature = "failpoints"))]
    pub fn setup() -> Option<()> {
        None
    }
}

pub mod cdc;
pub mod config;
pub mod engine;
mod error;
mod http;
pub mod metrics;
mod pipeline;
pub mod read_back;
pub mod sinks;
mod source;
mod status_page;
pub mod telemetry;

pub use config::{Config, ConfigOverrides, DatabaseUrl, Mode, RelayConfig};
pub use engine::run;
pub use error::{Failure, RelayError};
pub use sinks::SinkSettings;
