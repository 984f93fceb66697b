use outbox_postgres_cdc::CdcError;

/// Why the relay (or one of the `outbox` commands) stopped or could not start. Each
/// variant keeps its cause; [`RelayError::kind`] says what can be done about it and the
/// command's exit code follows from that ([`RelayError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Bad configuration, or a service that cannot be reached or used as configured at
    /// start-up. The message names the setting and what to do.
    #[error("{0}")]
    Config(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] outbox_postgres::Error),
    /// The replication stream failed (CDC).
    #[error(transparent)]
    Replication(#[from] CdcError),
    /// The server ended the replication stream (CDC).
    #[error("the server ended the replication stream")]
    StreamEnded,
    /// CDC: the replication slot cannot be trusted (invalidated, or vanished while rows
    /// it missed may be gone); the message gives the recovery.
    #[error("{0}")]
    SlotLost(String),
    /// A newer relay of the table fenced this one at the broker.
    #[error("a newer relay of this table fenced this one in Kafka (it took over while this one was paused or cut off); waiting as a standby")]
    Fenced,
    /// The broker could not be read back (`outbox verify`).
    #[error("reading the broker back: {0}")]
    ReadBack(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The HTTP endpoint (`/metrics`, `/healthz`) failed.
    #[error("the HTTP endpoint failed: {0}")]
    Http(#[source] std::io::Error),
}

/// What can be done about a [`RelayError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A setting or the environment must change first; retrying as is cannot help
    /// (exit code 2).
    Configuration,
    /// CDC's replication slot cannot be trusted: follow the recovery in the message
    /// (exit code 3).
    SlotLost,
    /// It may pass: the relay retries by itself while running; a command may simply be
    /// run again (exit code 1).
    Transient,
}

impl RelayError {
    pub fn kind(&self) -> Failure {
        match self {
            RelayError::Config(_) => Failure::Configuration,
            RelayError::SlotLost(_) => Failure::SlotLost,
            RelayError::Replication(CdcError::SlotLost { .. }) => Failure::SlotLost,
            RelayError::Replication(CdcError::Refused { .. } | CdcError::Url(_)) => {
                Failure::Configuration
            }
            RelayError::Store(_)
            | RelayError::Replication(_)
            | RelayError::StreamEnded
            | RelayError::Fenced
            | RelayError::ReadBack(_)
            | RelayError::Http(_) => Failure::Transient,
        }
    }

    /// The exit code of a command that ended with this error: 2 configuration, 3 slot
    /// lost, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self.kind() {
            Failure::Configuration => 2,
            Failure::SlotLost => 3,
            Failure::Transient => 1,
        }
    }

    pub fn is_config(&self) -> bool {
        self.kind() == Failure::Configuration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_kind() {
        let slot = CdcError::SlotLost {
            slot: "s".into(),
            detail: "invalidated".into(),
        };
        assert_eq!(RelayError::Replication(slot).exit_code(), 3);
        assert_eq!(RelayError::SlotLost("gone".into()).exit_code(), 3);
        assert_eq!(RelayError::Config("bad".into()).exit_code(), 2);
        assert_eq!(
            RelayError::Replication(CdcError::Url("no host".into())).exit_code(),
            2
        );
        assert_eq!(RelayError::StreamEnded.exit_code(), 1);
        assert_eq!(RelayError::Fenced.exit_code(), 1);
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "in use");
        let err = RelayError::Http(io);
        assert_eq!(err.exit_code(), 1);
        assert!(
            std::error::Error::source(&err).is_some(),
            "the cause is kept"
        );
    }
}
