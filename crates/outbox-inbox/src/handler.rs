//! What the application plugs in: a handler that applies one message inside the
//! transaction that also records its id.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::PgConnection;

use crate::message::{InboxMessage, PayloadError};

/// Applies one message to the application's state.
///
/// # Contract
///
/// - `tx` is a connection inside a transaction that already holds the message's inbox
///   row. Do every database write of the message through it, and neither commit nor
///   roll it back: the inbox commits it when `handle` returns `Ok`, and rolls it back
///   (inbox row included) when it returns `Err`.
/// - The handler runs at most once *successfully* per event id and consumer name, as
///   long as the inbox row is kept (see the retention setting). It can run more than
///   once when an attempt fails, so side effects outside the database (an e-mail, an
///   HTTP call) are at-least-once.
/// - Messages with the same key (one aggregate) are handled one at a time, in partition
///   order; different keys run concurrently.
/// - Do not swallow an SQL error and return `Ok`: PostgreSQL would refuse the rest of
///   the transaction. The inbox notices and counts it as a failed attempt.
///
/// Implement it on a struct, or wrap a closure with [`handler_fn`].
pub trait Handler: Send + Sync + 'static {
    /// Applies one message through `tx`; see the contract above.
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<H: Handler> Handler for Arc<H> {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        (**self).handle(tx, message)
    }
}

/// A [`Handler`] made from a closure; see [`handler_fn`].
pub struct FnHandler<F>(F);

/// Wraps a closure as a [`Handler`]:
///
/// ```no_run
/// use outbox_inbox::{handler_fn, HandlerError};
///
/// let handler = handler_fn(|tx, message| {
///     Box::pin(async move {
///         sqlx::query("UPDATE stock SET reserved = reserved + 1 WHERE sku = $1")
///             .bind(message.key_str().unwrap_or_default())
///             .execute(&mut *tx)
///             .await?;
///         Ok::<_, HandlerError>(())
///     })
/// });
/// ```
pub fn handler_fn<F>(f: F) -> FnHandler<F>
where
    F: for<'a> Fn(
            &'a mut PgConnection,
            &'a InboxMessage,
        ) -> BoxFuture<'a, Result<(), HandlerError>>
        + Send
        + Sync
        + 'static,
{
    FnHandler(f)
}

impl<F> Handler for FnHandler<F>
where
    F: for<'a> Fn(
            &'a mut PgConnection,
            &'a InboxMessage,
        ) -> BoxFuture<'a, Result<(), HandlerError>>
        + Send
        + Sync
        + 'static,
{
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        message: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        (self.0)(tx, message)
    }
}

/// Why a handler did not apply a message.
///
/// Any error converts into it with `?` and is *retried*: the attempt is rolled back and
/// repeated after a backoff, and the message is dead-lettered after the configured
/// number of attempts. [`HandlerError::permanent`] (and a [`PayloadError`] from
/// [`InboxMessage::payload_json`]) skips the remaining attempts: the message goes to
/// the dead-letter topic at once.
pub struct HandlerError {
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
    permanent: bool,
}

impl HandlerError {
    /// A failure worth retrying (a lock timeout, a service that is down).
    pub fn retry(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        HandlerError {
            source: error.into(),
            permanent: false,
        }
    }

    /// A failure that retrying cannot fix (an unknown event type, a payload that breaks
    /// a business rule): the message is dead-lettered without further attempts.
    pub fn permanent(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        HandlerError {
            source: error.into(),
            permanent: true,
        }
    }

    /// A retried failure with just a message.
    pub fn msg(message: impl fmt::Display) -> Self {
        HandlerError::retry(message.to_string())
    }

    /// True when the message is dead-lettered without further attempts.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        let permanent = (&error as &dyn Any).is::<PayloadError>();
        HandlerError {
            source: Box::new(error),
            permanent,
        }
    }
}

impl fmt::Display for HandlerError {
    /// The error and its causes, `: `-separated (a cause whose text the message already
    /// shows is not repeated).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.source.to_string();
        let mut cause = self.source.source();
        while let Some(error) = cause {
            let line = error.to_string();
            if !text.contains(&line) {
                text.push_str(": ");
                text.push_str(&line);
            }
            cause = error.source();
        }
        f.write_str(&text)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("source", &self.source)
            .field("permanent", &self.permanent)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_errors_are_retried_but_payload_errors_are_not() {
        let io: HandlerError = std::io::Error::other("disk on fire").into();
        assert!(!io.is_permanent());
        assert_eq!(io.to_string(), "disk on fire");

        let payload: HandlerError = PayloadError::Missing.into();
        assert!(payload.is_permanent());

        assert!(HandlerError::permanent("unknown event type").is_permanent());
        assert!(!HandlerError::msg("busy").is_permanent());
    }
}
