//! The outbox relay as a library: `run(config, shutdown)` publishes an outbox table to
//! Kafka until `shutdown` is cancelled, then drains what is in flight and returns.
//!
//! - [`config`]: settings from a TOML file, `OUTBOX_*` variables and flags, validated
//!   into a [`RelayConfig`].
//! - [`engine`]: leadership (one active relay per table) and the polling loop.
//! - [`metrics`] and the HTTP endpoint (`/metrics`, `/healthz`).

mod cdc;
pub mod config;
pub mod engine;
mod error;
mod http;
pub mod metrics;

pub use config::{Config, ConfigOverrides, DatabaseUrl, Mode, RelayConfig};
pub use engine::run;
pub use error::RelayError;
