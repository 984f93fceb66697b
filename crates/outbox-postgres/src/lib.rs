//! PostgreSQL side of the outbox.
//!
//! - [`migrate`]: creates and upgrades the outbox table (the plain contract of DESIGN.md),
//!   its indexes and the insert notification trigger.
//! - [`OutboxWriter`] / [`write`](fn@write) / [`write_all`]: insert events with the
//!   caller's own executor (a transaction, a connection or a pool); never begins or
//!   commits.
//! - [`PollingStore`]: what the polling relay does to the table: fetch pending rows in
//!   per-aggregate order, record outcomes, report statistics, manage dead letters.
//! - [`read_audit_rows`]: the rows `outbox verify` audits (read-only, SELECT is enough).
//! - [`DatabaseUrl`]: the URL every command connects with (TLS settings included), never
//!   printed with its password.
//! - [`LeaderLock`]: the advisory lock that keeps one relay active per outbox table.

#![deny(missing_docs)]

mod audit;
mod database_url;
mod error;
mod leader;
mod schema;
mod store;
mod writer;

pub use audit::{read_audit_rows, AuditRows, CreatedWindow};
pub use database_url::{
    connection_tls, describe_ssl_mode, redact_text, refused_connection_hint, DatabaseUrl, UrlError,
};
pub use error::Error;
pub use leader::{LeaderLock, LockHolder, RelaySession};
pub use schema::{migrate, schema_version, PayloadType, LATEST_VERSION};
pub use store::{
    check_cdc_privileges, header_entries, parse_headers, writer_deletes_since, Aggregate,
    DeadLetter, Fetch, OnPublish, OutboxStats, PollingStore, RetryingEvent, Waiting, WrittenBy,
};
pub use writer::{write, write_all, OutboxWriter};

pub use outbox_core::{Event, Payload, TableRef, TableRefError};
