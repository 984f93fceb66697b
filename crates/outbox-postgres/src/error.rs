use outbox_core::{PayloadError, TableRef};

/// Errors of the PostgreSQL side. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("the outbox table {table} does not exist; create it with `outbox migrate` (or outbox::migrate at start-up)")]
    TableMissing { table: TableRef },
    #[error("the outbox table {table} is at schema version {found} but this version of outbox needs {needed}; run `outbox migrate` to upgrade it")]
    SchemaOutdated {
        table: TableRef,
        found: i32,
        needed: i32,
    },
    #[error("the outbox table {table} was migrated by a newer outbox (schema version {found}, this one knows up to {known}); upgrade this binary")]
    SchemaTooNew {
        table: TableRef,
        found: i32,
        known: i32,
    },
    #[error("the database role {role:?} lacks {privilege} on {table}; grant it with: GRANT {privilege} ON {} TO {}", table.qualified(), outbox_core::quote_ident(role))]
    MissingPrivilege {
        role: String,
        privilege: &'static str,
        table: TableRef,
    },
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
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
