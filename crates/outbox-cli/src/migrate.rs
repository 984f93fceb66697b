//! `outbox migrate`: the table, and with `--cdc` the publication and the slot.

use outbox_postgres::PayloadType;
use outbox_relay::{RelayConfig, RelayError};

use crate::database::privilege_is_config;

pub(crate) async fn migrate(
    config: &RelayConfig,
    payload: PayloadType,
    cdc: bool,
) -> Result<(), RelayError> {
    let mut conn = outbox_relay::engine::connect(config).await?;
    let applied = outbox_postgres::migrate(&mut conn, &config.table, payload)
        .await
        .map_err(privilege_is_config)?;
    if applied.is_empty() {
        println!(
            "{} is up to date (schema version {})",
            config.table,
            outbox_postgres::LATEST_VERSION
        );
    } else {
        println!("{}: applied schema version(s) {:?}", config.table, applied);
    }
    if cdc {
        use outbox_postgres_cdc::slot::{self, SlotCreation};
        let database = slot::current_database(&mut conn)
            .await
            .map_err(|e| RelayError::Store(e.into()))?;
        let names = outbox_postgres_cdc::CdcNames::for_table(&database, &config.table);
        let objects = outbox_relay::cdc::set_up(&mut conn, &config.table, &names).await?;
        println!(
            "publication {:?}: {}",
            names.publication,
            if objects.publication_created {
                "created"
            } else {
                "exists"
            }
        );
        match objects.slot {
            SlotCreation::Existed => println!("replication slot {:?}: exists", names.slot),
            SlotCreation::Created => println!("replication slot {:?}: created", names.slot),
            SlotCreation::Recreated { last_checkpoint } => println!(
                "replication slot {:?}: created again (it had vanished); the relay publishes the rows committed after its last checkpoint ({last_checkpoint}) before it streams",
                names.slot
            ),
        }
    }
    Ok(())
}
