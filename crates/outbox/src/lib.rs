//! # outbox: reliable event publishing from your PostgreSQL transactions
//!
//! Write your business rows and the events that describe them in **one** transaction;
//! the `outbox` relay publishes the events to Kafka and marks each one only after the
//! broker acknowledged it. Nothing committed is lost, nothing rolled back is published,
//! and each aggregate's events keep their order.
//!
//! This crate is what an application links: the [`Event`] type, the writer (which
//! takes *your* executor and never begins or commits anything) and the migrations.
//!
//! ```no_run
//! use outbox::{Event, OutboxWriter};
//!
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! // At start-up (or run `outbox migrate` once):
//! outbox::migrate(&mut *pool.acquire().await?, &outbox::TableRef::default(), outbox::PayloadType::Jsonb).await?;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = $1")
//!     .bind(7_i64)
//!     .execute(&mut *tx)
//!     .await?;
//! let event = Event::json("account", "7", "AccountDebited", &serde_json::json!({"amount": 10}))?
//!     .with_header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
//! outbox::write(&mut *tx, &event).await?;
//! tx.commit().await?; // the event exists exactly when the debit does
//! # Ok(())
//! # }
//! ```
//!
//! Writers in other languages need no library: the table is a plain contract (see
//! README.md), so an `INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)`
//! in the same transaction is all it takes.
#![deny(missing_docs)]

pub use outbox_core::{Event, Payload, PayloadError, TableRef, TableRefError};
pub use outbox_postgres::{
    migrate, schema_version, write, write_all, Error, OutboxWriter, PayloadType, LATEST_VERSION,
};
/// The sqlx this crate is built with (0.9): use it, or depend on the same major
/// version, so that your pool and transactions are the types `write` takes.
pub use sqlx;

/// Every Rust block of README.md, compiled as a doctest: a README that stops compiling
/// fails `scripts/test`.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
