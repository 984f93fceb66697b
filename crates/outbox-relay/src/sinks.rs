//! The sinks the relay can publish to, built from its configuration. The engine sees
//! only `dyn Sink`; a new broker is a new sink crate and one arm here.

use std::sync::Arc;

use outbox_core::Sink;
use outbox_kafka::KafkaSink;

use crate::config::RelayConfig;
use crate::RelayError;

/// The sink `config` names.
pub(crate) fn build(config: &RelayConfig) -> Result<Arc<dyn Sink>, RelayError> {
    let kafka =
        KafkaSink::new(config.kafka.clone()).map_err(|e| RelayError::Config(e.to_string()))?;
    Ok(Arc::new(kafka))
}
