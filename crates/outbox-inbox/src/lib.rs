//! # outbox-inbox: idempotent Kafka consumers for PostgreSQL services
//!
//! Kafka delivers at least once: after a crash, a rebalance or a producer retry the same
//! event arrives again. The inbox makes applying it happen once. For each message, in
//! **one** database transaction, it records the event id (the `id` header, which the
//! outbox relay and Debezium's outbox router set) in an inbox table under the
//! consumer's name and runs your handler with that same transaction. An id already in
//! the table skips the handler. The Kafka offset is committed only after the database
//! commit: a crash in between replays the message, and the inbox drops it.
//!
//! ```no_run
//! use std::time::Duration;
//! use outbox_inbox::{handler_fn, Inbox, HandlerError};
//! use tokio_util::sync::CancellationToken;
//!
//! #[derive(serde::Deserialize)]
//! struct OrderCreated { total: i64 }
//!
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let inbox = Inbox::builder(pool, "kafka-1:9092", "billing", "billing")
//!     .topics(["outbox.event.order"])
//!     .max_attempts(5)
//!     .backoff(Duration::from_millis(200), Duration::from_secs(30))
//!     .build()?;
//! inbox.migrate().await?; // or once, at deployment
//!
//! let handler = handler_fn(|tx, message| {
//!     Box::pin(async move {
//!         let order: OrderCreated = message.payload_json()?; // bad JSON: dead-lettered at once
//!         sqlx::query("INSERT INTO invoices (order_id, total) VALUES ($1, $2)")
//!             .bind(message.key_str())
//!             .bind(order.total)
//!             .execute(&mut *tx)
//!             .await?; // an error rolls back and retries
//!         Ok::<_, HandlerError>(())
//!     })
//! });
//! let shutdown = CancellationToken::new(); // cancel it on SIGTERM
//! inbox.run(handler, shutdown).await?;
//! # Ok(())
//! # }
//! ```
//!
//! ## What it guarantees
//!
//! - **Once per event id.** A handler's transaction commits at most once per id and
//!   consumer name, even when two members of the group briefly overlap during a
//!   rebalance (the second waits on the first's uncommitted inbox row, then skips).
//!   This holds as long as the id's inbox row is kept: rows older than the retention
//!   are deleted, and a duplicate arriving after that is processed again. By default
//!   the retention is as long as the topics may keep a message (`retention.ms +
//!   segment.ms`, read from the brokers), and a shorter one is refused at start.
//! - **Per-aggregate order.** Messages with the same key (the aggregate id) are handled
//!   one at a time in partition order; a message that is retrying holds back only its
//!   own key. Different keys run concurrently.
//! - **No offset past unfinished work.** The committed offset of a partition is the
//!   lowest offset not yet done. Offsets are committed every `commit_interval`, and
//!   synchronously when partitions are revoked and on shutdown.
//! - **Poison messages do not block.** A failing handler is retried with backoff; after
//!   `max_attempts` the message goes to the dead-letter topic (`<topic>.dlq` by
//!   default) with its key, value and headers plus `outbox.inbox.error` and
//!   `outbox.inbox.attempts`, is recorded in the inbox as `dead_lettered`, and the
//!   next message of its key proceeds. A message without a valid `id` header is
//!   dead-lettered at once: the inbox cannot deduplicate it.
//!
//! Dead letters are at-least-once: a crash between the dead-letter write and its inbox
//! record (or replays of a message without an id) can write one twice.
#![deny(missing_docs)]

mod consumer;
mod dead_letter;
mod error;
mod handler;
mod inbox;
mod lanes;
mod message;
mod offsets;
mod retention;
mod settings;
mod stats;
mod table;

pub use dead_letter::{ATTEMPTS_HEADER, CONSUMER_HEADER, ERROR_HEADER, SOURCE_HEADER};
pub use error::InboxError;
pub use handler::{handler_fn, FnHandler, Handler, HandlerError};
pub use inbox::Inbox;
pub use message::{InboxMessage, PayloadError, ID_HEADER};
pub use outbox_core::{TableRef, TableRefError};
pub use settings::InboxBuilder;
/// The sqlx this crate is built with (0.9), for the pool and the handler's transaction.
pub use sqlx;
pub use stats::InboxStats;
pub use table::{default_table, migrate, purge_expired};
/// What [`Inbox::run`] takes to stop: cancel it on SIGTERM.
pub use tokio_util::sync::CancellationToken;
