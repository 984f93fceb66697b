//! The replication stream of an outbox table, as outbox events.

use std::time::Duration;

use outbox_core::{StoredEvent, TableRef};
use pgwire_replication::{
    PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, SslMode, TlsConfig,
};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::ConnectOptions;
use uuid::Uuid;

use crate::pgoutput::{Change, DecodeError, Decoder, Relation, Value, BYTEA_OID};
use crate::{CdcNames, Lsn};

/// What the stream yields, in commit order.
#[derive(Debug, Clone, PartialEq)]
pub enum CdcEvent {
    /// A transaction begins; its rows follow.
    Begin,
    /// An outbox row inserted by a committed transaction.
    Row(StoredEvent),
    /// The end of a transaction: once every row before it has been acknowledged by
    /// the broker, `end_lsn` may be confirmed.
    Commit { end_lsn: Lsn },
    /// The server has nothing for us up to `wal_end` (a keepalive, or the relay's own
    /// heartbeat message): confirmable when nothing is in flight, so an idle outbox
    /// next to a busy database does not hold WAL back.
    Idle { wal_end: Lsn },
    /// Someone updated an outbox row; outbox rows are immutable events, so the update is
    /// not published.
    RejectedUpdate { id: Option<Uuid> },
    /// A row inserted to wait in the table (`next_attempt_at` set: a dead letter queued
    /// again, or a row the relay keeps waiting): it is published from the table, and its
    /// aggregate's later rows wait behind it.
    Waiting {
        aggregate_type: String,
        aggregate_id: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CdcError {
    /// Postgres invalidated the slot (it fell behind `max_slot_wal_keep_size`). WAL the
    /// relay never read is gone; the slot must not be silently re-created.
    #[error("the replication slot {slot:?} was invalidated by PostgreSQL ({detail}); events written while it was behind may not have been published. Recovery: rows still in the outbox table can be republished by polling mode (`outbox relay --mode polling`); then drop the slot (SELECT pg_drop_replication_slot('{slot}')) and run `outbox migrate --cdc` to create a new one. See README, \"CDC slot invalidated\".")]
    SlotLost { slot: String, detail: String },
    #[error("database_url cannot be used for replication: {0}")]
    Url(String),
    /// The server or TLS refused the replication connection; retrying cannot help.
    #[error("PostgreSQL refused the replication connection: {hint} ({detail})")]
    Refused { hint: &'static str, detail: String },
    #[error("replication stream: {0}")]
    Stream(#[from] PgWireError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("outbox row cannot be read: {0}")]
    Row(String),
}

impl CdcError {
    fn classify(err: PgWireError, slot: &str) -> CdcError {
        let text = err.to_string();
        let refusal = match &err {
            PgWireError::Auth(_) | PgWireError::Tls(_) => true,
            // Class 28: invalid authorization (pg_hba.conf, password).
            PgWireError::Server(message) => message.contains("SQLSTATE 28"),
            _ => false,
        };
        if refusal {
            return CdcError::Refused {
                hint: outbox_postgres::refused_connection_hint(&text).unwrap_or(
                    "check the user, password and TLS settings (sslmode, sslrootcert) in database_url",
                ),
                detail: text,
            };
        }
        // The replication client reports the server's error as text only; its SQLSTATE
        // (55000, object not in prerequisite state) is read from there.
        if text.contains("SQLSTATE 55000") && text.contains("replication slot") {
            return CdcError::SlotLost {
                slot: slot.to_string(),
                detail: text,
            };
        }
        CdcError::Stream(err)
    }
}

/// The replication connection of `connect`: the same host, socket, user, password,
/// database and TLS settings as the relay's other connections, read from sqlx's parse of
/// the URL (never a second parser), so one URL means the same everywhere.
fn replication_config(
    connect: &PgConnectOptions,
    names: &CdcNames,
) -> Result<ReplicationConfig, CdcError> {
    // sqlx keeps the password and certificate paths private; its own rendering of the
    // options carries them.
    let rendered = connect.to_url_lossy();
    let password = rendered
        .password()
        .map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let parameter = |name: &str| -> Result<Option<std::path::PathBuf>, CdcError> {
        match rendered.query_pairs().find(|(key, _)| key == name) {
            None => Ok(None),
            Some((_, value)) => match value.strip_prefix("file: ") {
                Some(path) => Ok(Some(path.into())),
                None => Err(CdcError::Url(format!(
                    "{name} must be the path of a PEM file for the replication connection, not the certificate itself"
                ))),
            },
        }
    };
    let database = connect.get_database().unwrap_or(connect.get_username());
    // `publication_names` is a list of identifiers: unquoted, PostgreSQL would fold
    // `OutboxEvents_pub` to lower case and split at spaces.
    let publication = outbox_core::quote_ident(&names.publication);
    if let Some(socket) = connect.get_socket() {
        return Ok(ReplicationConfig::unix(
            socket.display().to_string(),
            connect.get_port(),
            connect.get_username(),
            password,
            database,
            names.slot.clone(),
            publication,
        ));
    }
    let ca = parameter("sslrootcert")?;
    let mut tls = match connect.get_ssl_mode() {
        PgSslMode::Disable => TlsConfig::disabled(),
        // The replication client has no "plaintext first" mode; both accept either.
        PgSslMode::Allow | PgSslMode::Prefer => TlsConfig {
            mode: SslMode::Prefer,
            ..TlsConfig::default()
        },
        PgSslMode::Require => TlsConfig::require(),
        PgSslMode::VerifyCa => TlsConfig::verify_ca(ca),
        PgSslMode::VerifyFull => TlsConfig::verify_full(ca),
    };
    match (parameter("sslcert")?, parameter("sslkey")?) {
        (Some(cert), Some(key)) => tls = tls.with_client_cert(cert, key),
        (None, None) => {}
        _ => {
            return Err(CdcError::Url(
                "sslcert and sslkey must be given together (the client certificate and its key)"
                    .into(),
            ))
        }
    }
    Ok(ReplicationConfig::new(
        connect.get_host(),
        connect.get_username(),
        password,
        database,
        names.slot.clone(),
        publication,
    )
    .with_port(connect.get_port())
    .with_tls(tls))
}

/// Reads outbox inserts from the table's slot.
pub struct CdcStream {
    client: ReplicationClient,
    decoder: Decoder,
    table: TableRef,
    slot: String,
    /// When a position was last confirmed: the client reports it to the server at the
    /// next status interval, which a clean shutdown waits for.
    last_confirm: Option<std::time::Instant>,
}

/// How often, at most, the confirmed position is reported to the server. Short, because
/// after a crash the next relay resends everything past the last reported position:
/// at 1 s, a relay killed every second under 1,500 events/s resent about 5,000 events
/// per kill (scripts/chaos, relay-kill).
const STATUS_INTERVAL: Duration = Duration::from_millis(100);
/// Messages the replication client may read ahead of the relay. Small, so that what is
/// buffered beyond the relay's batch stays small even with large events (the client's
/// default, 8,192, would hold gigabytes of 1 MiB events during a broker outage). A
/// relay draining 2 GiB of 960 KiB events peaked at 89 MiB with 64, at 51 MiB with 16;
/// the drain of 1 KiB events did not measurably change (bench, three runs of each).
const READ_AHEAD_MESSAGES: usize = 16;

impl CdcStream {
    /// Starts streaming from the slot's confirmed position.
    /// `session_options` are sent at connection start (`-c name=value`), as for the
    /// relay's other connections (its keepalive settings).
    pub async fn start(
        connect: &PgConnectOptions,
        names: &CdcNames,
        table: TableRef,
        session_options: &[(&str, String)],
    ) -> Result<Self, CdcError> {
        let config = replication_config(connect, names)?
            .with_start_lsn(Lsn::ZERO)
            .with_status_interval(STATUS_INTERVAL)
            .with_buffer_size(READ_AHEAD_MESSAGES)
            .with_wakeup_interval(Duration::from_secs(5))
            .with_application_name("outbox-relay-cdc");
        let config = if session_options.is_empty() {
            config
        } else {
            config.with_options(
                session_options
                    .iter()
                    .map(|(name, value)| format!("-c {name}={value}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        };
        let mut client = ReplicationClient::connect(config)
            .await
            .map_err(|e| CdcError::classify(e, &names.slot))?;
        client
            .wait_started()
            .await
            .map_err(|e| CdcError::classify(e, &names.slot))?;
        Ok(CdcStream {
            client,
            decoder: Decoder::default(),
            table,
            slot: names.slot.clone(),
            last_confirm: None,
        })
    }

    /// The next event; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<CdcEvent>, CdcError> {
        loop {
            let event = match self.client.recv().await {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(None),
                Err(err) => return Err(CdcError::classify(err, &self.slot)),
            };
            match event {
                ReplicationEvent::Begin { .. } => return Ok(Some(CdcEvent::Begin)),
                ReplicationEvent::Commit { end_lsn, .. } => {
                    return Ok(Some(CdcEvent::Commit { end_lsn }))
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    return Ok(Some(CdcEvent::Idle { wal_end }))
                }
                ReplicationEvent::XLogData { data, .. } => {
                    if let Some(event) = self.change(&data)? {
                        return Ok(Some(event));
                    }
                }
                // The relay's own heartbeats (pg_logical_emit_message): a position
                // with nothing before it left to read.
                ReplicationEvent::Message { lsn, .. } => {
                    return Ok(Some(CdcEvent::Idle { wal_end: lsn }))
                }
                ReplicationEvent::StoppedAt { .. } => return Ok(None),
            }
        }
    }

    fn change(&mut self, data: &[u8]) -> Result<Option<CdcEvent>, CdcError> {
        let Some(change) = self.decoder.decode(data)? else {
            return Ok(None);
        };
        let (relation, values, is_insert) = match change {
            Change::Insert { relation, values } => (relation, values, true),
            Change::Update { relation, values } => (relation, values, false),
            Change::Delete { .. } | Change::Truncate => return Ok(None),
        };
        let relation = self
            .decoder
            .relation(relation)
            .ok_or_else(|| CdcError::Row(format!("change for unknown relation {relation}")))?;
        if relation.schema != self.table.schema || relation.name != self.table.name {
            return Ok(None);
        }
        let set = |name: &str| !matches!(column(relation, &values, name), None | Some(Value::Null));
        // Rows the relay itself keeps as dead letters are not events to publish.
        if set("dead_lettered_at") {
            return Ok(None);
        }
        // The relay's own bookkeeping of rows it publishes from the table.
        if !is_insert && (set("next_attempt_at") || set("published_at")) {
            return Ok(None);
        }
        if is_insert && set("next_attempt_at") {
            return Ok(Some(CdcEvent::Waiting {
                aggregate_type: text(relation, &values, "aggregatetype")?,
                aggregate_id: text(relation, &values, "aggregateid")?,
            }));
        }
        if !is_insert {
            let id = text(relation, &values, "id")
                .ok()
                .and_then(|id| id.parse().ok());
            return Ok(Some(CdcEvent::RejectedUpdate { id }));
        }
        Ok(Some(CdcEvent::Row(stored_event(relation, &values)?)))
    }

    /// Confirms `lsn` to Postgres: everything before it may be discarded.
    pub fn confirm(&mut self, lsn: Lsn) {
        self.client.update_applied_lsn(lsn);
        self.last_confirm = Some(std::time::Instant::now());
    }

    /// Closes the stream once the last confirmed position has been reported (the client
    /// reports it at its next status interval, and does not on closing), so a clean
    /// stop does not make the next relay publish the last second again.
    pub async fn shutdown(mut self) {
        if let Some(at) = self.last_confirm {
            let reported = at + STATUS_INTERVAL + Duration::from_millis(200);
            tokio::time::sleep_until(reported.into()).await;
        }
        let _ = self.client.shutdown().await;
    }
}

fn column<'a>(relation: &Relation, values: &'a [Value], name: &str) -> Option<&'a Value> {
    relation.column(name).and_then(|i| values.get(i))
}

fn text(relation: &Relation, values: &[Value], name: &str) -> Result<String, CdcError> {
    match column(relation, values, name) {
        Some(Value::Text(bytes)) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        _ => Err(CdcError::Row(format!("column {name} is missing or null"))),
    }
}

fn stored_event(relation: &Relation, values: &[Value]) -> Result<StoredEvent, CdcError> {
    let id: Uuid = text(relation, values, "id")?
        .parse()
        .map_err(|e| CdcError::Row(format!("id is not a UUID: {e}")))?;
    let seq: i64 = text(relation, values, "seq")?
        .parse()
        .map_err(|e| CdcError::Row(format!("seq is not a number: {e}")))?;
    let payload = match (
        relation.column("payload"),
        column(relation, values, "payload"),
    ) {
        (Some(i), Some(Value::Text(bytes))) if relation.types.get(i) == Some(&BYTEA_OID) => Some(
            decode_bytea_hex(bytes)
                .ok_or_else(|| CdcError::Row("payload is not hex bytea".into()))?,
        ),
        (_, Some(Value::Text(bytes))) => Some(bytes.clone()),
        _ => None,
    };
    // A value that cannot be parsed makes this one event unreadable (dead-lettered with
    // the reason); it must not stop the stream.
    let (headers, unreadable) = match column(relation, values, "headers") {
        Some(Value::Text(bytes)) => match outbox_postgres::parse_headers(bytes) {
            Ok(headers) => (headers, None),
            Err(reason) => (Vec::new(), Some(reason)),
        },
        _ => (Vec::new(), None),
    };
    Ok(StoredEvent {
        seq,
        id,
        aggregate_type: text(relation, values, "aggregatetype")?,
        aggregate_id: text(relation, values, "aggregateid")?,
        event_type: text(relation, values, "type")?,
        payload,
        headers,
        attempts: 0,
        unreadable,
        retried_dead_letter: !matches!(
            column(relation, values, "dead_letter_retried_at"),
            None | Some(Value::Null)
        ),
    })
}

/// bytea's text output: `\x` then two hex digits per byte.
fn decode_bytea_hex(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.chunks(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16);
            Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::tests::{insert_message, relation_message};

    #[test]
    fn bytea_hex_decodes() {
        assert_eq!(decode_bytea_hex(b"\\x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_bytea_hex(b"\\x0"), None);
        assert_eq!(decode_bytea_hex(b"00"), None);
    }

    fn replication_config_of(url: &str) -> Result<ReplicationConfig, CdcError> {
        let options: PgConnectOptions = url.parse().unwrap();
        let names = CdcNames {
            publication: "outbox_pub".into(),
            slot: "outbox_slot".into(),
        };
        replication_config(&options, &names)
    }

    #[test]
    fn the_replication_connection_reads_the_url_as_sqlx_does() {
        let config = replication_config_of(
            "postgres://relay:p%26ss%3Dw%40rd@db.example:6543/app?sslmode=verify-full&sslrootcert=/etc/ca.pem&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(config.host, "db.example");
        assert_eq!(config.port, 6543);
        assert_eq!(config.user, "relay");
        assert_eq!(config.password, "p&ss=w@rd");
        assert_eq!(config.database, "app");
        assert_eq!(config.tls.mode, SslMode::VerifyFull);
        assert_eq!(config.tls.ca_pem_path, Some("/etc/ca.pem".into()));
        assert!(config.tls.is_mtls());

        let query_host = replication_config_of(
            "postgres://relay@ignored/app?host=db2&port=7000&sslmode=require",
        )
        .unwrap();
        assert_eq!((query_host.host.as_str(), query_host.port), ("db2", 7000));
        assert_eq!(query_host.tls.mode, SslMode::Require);

        let socket =
            replication_config_of("postgres://relay@localhost/app?host=/var/run/postgresql")
                .unwrap();
        assert!(socket.is_unix_socket());
        assert_eq!(socket.tls.mode, SslMode::Disable);

        let disabled = replication_config_of("postgres://relay@h/app?sslmode=disable").unwrap();
        assert_eq!(disabled.tls.mode, SslMode::Disable);
        assert!(replication_config_of("postgres://relay@h/app?sslcert=/c.pem").is_err());
    }

    #[test]
    fn an_insert_becomes_a_stored_event() {
        let mut decoder = Decoder::default();
        let columns = [
            "id",
            "aggregatetype",
            "aggregateid",
            "type",
            "payload",
            "headers",
            "created_at",
            "seq",
            "dead_lettered_at",
        ];
        decoder
            .decode(&relation_message(1, "public", "outbox", &columns))
            .unwrap();
        let id = Uuid::now_v7().to_string();
        let change = decoder
            .decode(&insert_message(
                1,
                &[
                    Some(&id),
                    Some("order"),
                    Some("42"),
                    Some("OrderCreated"),
                    Some("{\"a\": 1}"),
                    Some("{\"t\": \"x\"}"),
                    Some("2026-01-01"),
                    Some("7"),
                    None,
                ],
            ))
            .unwrap()
            .unwrap();
        let Change::Insert { values, .. } = change else {
            panic!("insert expected")
        };
        let event = stored_event(decoder.relation(1).unwrap(), &values).unwrap();
        assert_eq!(event.id.to_string(), id);
        assert_eq!(event.seq, 7);
        assert_eq!(event.aggregate_id, "42");
        assert_eq!(event.payload.as_deref(), Some(&b"{\"a\": 1}"[..]));
        assert_eq!(event.headers, vec![("t".to_string(), "x".to_string())]);
    }
}
