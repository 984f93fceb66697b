/// Why the relay stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Bad configuration, or a service that cannot be reached or used at start-up. The
    /// message names the setting and what to do. The command exits with code 2.
    #[error("{0}")]
    Config(String),
    /// Any other failure (exit code 1).
    #[error(transparent)]
    Store(#[from] outbox_postgres::Error),
    /// CDC: PostgreSQL invalidated the replication slot. The command exits with code 3.
    #[error("{0}")]
    SlotLost(String),
    #[error("{0}")]
    Other(String),
}

impl RelayError {
    pub fn is_config(&self) -> bool {
        matches!(self, RelayError::Config(_))
    }
}
