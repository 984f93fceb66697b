//! Opening the outbox table for the administrative commands.

use outbox_postgres::PollingStore;
use outbox_relay::{RelayConfig, RelayError};

/// A database that refuses for lack of rights is a configuration problem (exit 2).
pub(crate) fn privilege_is_config(err: outbox_postgres::Error) -> RelayError {
    if let outbox_postgres::Error::Database(sqlx::Error::Database(db)) = &err {
        if db.code().as_deref() == Some("42501") {
            return RelayError::Config(format!(
                "the database role lacks a privilege: {}; grant it, or run this command as the table's owner",
                db.message()
            ));
        }
    }
    match err {
        outbox_postgres::Error::Database(_) => RelayError::Store(err),
        other => RelayError::Config(other.to_string()),
    }
}

pub(crate) async fn open_store(
    config: &RelayConfig,
) -> Result<(sqlx::PgConnection, PollingStore), RelayError> {
    let mut conn = outbox_relay::engine::connect(config).await?;
    let store = PollingStore::open(&mut conn, config.table.clone())
        .await
        .map_err(privilege_is_config)?;
    Ok((conn, store))
}

/// [`open_store`] for commands that only read: SELECT on the table is enough.
pub(crate) async fn open_read_only_store(
    config: &RelayConfig,
) -> Result<(sqlx::PgConnection, PollingStore), RelayError> {
    let mut conn = outbox_relay::engine::connect(config).await?;
    let store = PollingStore::open_read_only(&mut conn, config.table.clone())
        .await
        .map_err(privilege_is_config)?;
    Ok((conn, store))
}
