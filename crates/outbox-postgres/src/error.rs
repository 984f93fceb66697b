use outbox_core::{PayloadError, TableRef};

use crate::PayloadType;

/// Errors of the PostgreSQL side. Each says what to do about it.
///
/// `Debug` shows the message and its causes, so a program whose `main` returns
/// `Result<(), Box<dyn Error>>` prints the fix, not a struct dump.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The outbox table does not exist: create it with `outbox migrate` (or
    /// [`migrate`](crate::migrate) at start-up).
    #[error("the outbox table {table} does not exist; create it with `outbox migrate` (or outbox::migrate at start-up)")]
    TableMissing {
        /// The table that was looked for.
        table: TableRef,
    },
    #[error("the outbox table {table} is at schema version {found} but this version of outbox needs {needed}; run `outbox migrate` to upgrade it")]
    /// The table is at an older schema version than this build needs: run
    /// `outbox migrate` to upgrade it.
    SchemaOutdated {
        /// The outbox table.
        table: TableRef,
        /// The version the table is at.
        found: i32,
        /// The version this build needs ([`LATEST_VERSION`](crate::LATEST_VERSION)).
        needed: i32,
    },
    #[error("the outbox table {table} was migrated by a newer outbox (schema version {found}, this one knows up to {known}); upgrade this binary")]
    /// A newer outbox migrated the table past what this build knows: upgrade this
    /// binary (or library) rather than write to or relay from a schema it does not know.
    SchemaTooNew {
        /// The outbox table.
        table: TableRef,
        /// The version the table is at.
        found: i32,
        /// The newest version this build knows.
        known: i32,
    },
    #[error("the database role {role:?} lacks {privilege} on {table}; grant it with: GRANT {privilege} ON {} TO {}", table.qualified(), outbox_core::quote_ident(role))]
    /// The connected role lacks a privilege it needs on a table; the message gives the
    /// `GRANT` that fixes it.
    MissingPrivilege {
        /// The role connected as (`current_user`).
        role: String,
        /// The missing privilege, such as `UPDATE`.
        privilege: &'static str,
        /// The table it is missing on (the outbox table or one derived from it).
        table: TableRef,
    },
    #[error("the outbox table {table} does not store {writer} payloads ({source}); write with OutboxWriter::with_payload_type(table, PayloadType::{other:?}), or migrate a table with `outbox migrate --payload-type {writer}`", writer = writer.sql_type(), other = other_payload_type(*writer))]
    /// The table's `payload` column is not of the writer's payload type: write with
    /// [`OutboxWriter::with_payload_type`](crate::OutboxWriter::with_payload_type) and the
    /// table's type, or write into a table migrated for this one.
    PayloadTypeMismatch {
        /// The table written into.
        table: TableRef,
        /// The payload type the writer binds.
        writer: PayloadType,
        /// The database's refusal of the insert.
        source: sqlx::Error,
    },
    /// A payload the table's column cannot store (bytes that are not JSON, for `jsonb`).
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// Anything else the database or the connection reported;
    /// [`Error::is_connection`] tells whether reconnecting may help.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        outbox_core::write_error_chain(self, f)
    }
}

impl Error {
    /// True when the error comes from a lost or refused connection rather than from the
    /// data or the schema, so waiting and reconnecting may help.
    pub fn is_connection(&self) -> bool {
        matches!(
            self,
            Error::Database(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_)
                    | sqlx::Error::WorkerCrashed
            )
        )
    }
}

/// The payload type a table holds when it does not hold `writer`'s.
fn other_payload_type(writer: PayloadType) -> PayloadType {
    match writer {
        PayloadType::Jsonb => PayloadType::Bytea,
        PayloadType::Bytea => PayloadType::Jsonb,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `main() -> Result<(), Box<dyn Error>>` prints when a write fails: the
    /// message with its fix, not a struct dump.
    #[test]
    fn debug_shows_the_message_and_its_fix() {
        let err = Error::TableMissing {
            table: TableRef::default(),
        };
        let boxed: Box<dyn std::error::Error> = Box::new(err);
        let shown = format!("Error: {boxed:?}");
        assert!(
            shown.starts_with("Error: the outbox table public.outbox does not exist")
                && shown.contains("outbox migrate"),
            "{shown}"
        );
        let caused = Error::PayloadTypeMismatch {
            table: TableRef::default(),
            writer: PayloadType::Jsonb,
            source: sqlx::Error::Protocol("column \"payload\" is of type bytea".into()),
        };
        let shown = format!("{caused:?}");
        assert!(shown.contains("Caused by:\n    "), "{shown}");
    }
}
