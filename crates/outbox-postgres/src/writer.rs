//! Writing events inside the application's own transaction.

use std::borrow::Cow;
use std::collections::BTreeMap;

use outbox_core::{Event, TableRef, TraceParent, TRACEPARENT, TRACESTATE};
use sqlx::types::Json;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::{Error, PayloadType};

/// An event's headers, as the `headers` column takes them.
type Headers = BTreeMap<String, String>;

/// Writes events into an outbox table with the caller's executor.
///
/// # Transactions
/// The writer never begins, commits or rolls back anything: pass the transaction that
/// holds your business change (`&mut *tx`), and the events become visible to the relay
/// exactly when that transaction commits. If it rolls back, no event is ever published.
///
/// # Example
/// ```no_run
/// use outbox_postgres::{Event, OutboxWriter};
///
/// # async fn place_order(pool: &sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// let outbox = OutboxWriter::default(); // public.outbox, jsonb payloads
/// let mut tx = pool.begin().await?;
/// sqlx::query("INSERT INTO orders (id, total) VALUES ($1, $2)")
///     .bind(42_i64)
///     .bind(1299_i64)
///     .execute(&mut *tx)
///     .await?;
/// let event = Event::json("order", "42", "OrderCreated", &serde_json::json!({"total": 1299}))?;
/// outbox.write(&mut *tx, &event).await?;
/// tx.commit().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct OutboxWriter {
    table: TableRef,
    payload_type: PayloadType,
    insert_many: String,
}

impl Default for OutboxWriter {
    fn default() -> Self {
        OutboxWriter::new(TableRef::default())
    }
}

impl OutboxWriter {
    /// A writer for `table`, whose payload column is `jsonb`.
    pub fn new(table: TableRef) -> Self {
        OutboxWriter::with_payload_type(table, PayloadType::Jsonb)
    }

    /// A writer for a table migrated with the given payload type.
    pub fn with_payload_type(table: TableRef, payload_type: PayloadType) -> Self {
        let payload_sql = payload_type.sql_type();
        // WITH ORDINALITY ... ORDER BY keeps the events' order in `seq`, which is the
        // order the relay publishes one aggregate's events in.
        let insert_many = format!(
            "INSERT INTO {t} (id, aggregatetype, aggregateid, type, payload, headers)
             SELECT id, aggregatetype, aggregateid, type, payload, headers
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::{payload_sql}[], $6::jsonb[])
                  WITH ORDINALITY AS e(id, aggregatetype, aggregateid, type, payload, headers, n)
             ORDER BY n",
            t = table.qualified(),
        );
        OutboxWriter {
            table,
            payload_type,
            insert_many,
        }
    }

    /// Writes one event. See [`OutboxWriter::write_all`].
    pub async fn write<'e, E>(&self, executor: E, event: &Event) -> Result<(), Error>
    where
        E: PgExecutor<'e>,
    {
        self.write_all(executor, std::slice::from_ref(event)).await
    }

    /// Writes `events` in one statement; they are published in this order (per aggregate).
    ///
    /// # Errors
    /// [`Error::Payload`] when a bytes payload is not JSON but the table stores `jsonb`;
    /// [`Error::TableMissing`] when the table does not exist (run `outbox migrate`);
    /// [`Error::PayloadTypeMismatch`] when the table's payload column is not of this
    /// writer's payload type; [`Error::Database`] for anything else the database refuses,
    /// such as a repeated event id (a primary-key violation).
    pub async fn write_all<'e, E>(&self, executor: E, events: &[Event]) -> Result<(), Error>
    where
        E: PgExecutor<'e>,
    {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len();
        let mut ids: Vec<Uuid> = Vec::with_capacity(n);
        let mut aggregate_types: Vec<&str> = Vec::with_capacity(n);
        let mut aggregate_ids: Vec<&str> = Vec::with_capacity(n);
        let mut types: Vec<&str> = Vec::with_capacity(n);
        let mut headers: Vec<Option<Json<Cow<'_, Headers>>>> = Vec::with_capacity(n);
        let trace = current_trace_headers();
        for event in events {
            ids.push(event.id);
            aggregate_types.push(&event.aggregate_type);
            aggregate_ids.push(&event.aggregate_id);
            types.push(&event.event_type);
            let mut these = Cow::Borrowed(&event.headers);
            // The caller's trace, unless the event names one itself.
            if !trace.is_empty() && !event.headers.contains_key(TRACEPARENT) {
                these.to_mut().extend(trace.iter().cloned());
            }
            headers.push((!these.is_empty()).then_some(Json(these)));
        }
        let query = sqlx::query(sqlx::AssertSqlSafe(String::from(&self.insert_many)))
            .bind(ids)
            .bind(aggregate_types)
            .bind(aggregate_ids)
            .bind(types);
        let query = match self.payload_type {
            PayloadType::Jsonb => {
                let payloads = events
                    .iter()
                    .map(|e| e.payload.to_json().map(Json))
                    .collect::<Result<Vec<_>, _>>()?;
                query.bind(payloads)
            }
            PayloadType::Bytea => {
                let payloads: Vec<Vec<u8>> = events.iter().map(|e| e.payload.to_bytes()).collect();
                query.bind(payloads)
            }
        };
        match query.bind(headers).execute(executor).await {
            Ok(_) => Ok(()),
            Err(error) => Err(self.explain(error)),
        }
    }

    /// The table this writer writes into.
    pub fn table(&self) -> &TableRef {
        &self.table
    }

    /// The payload type this writer binds.
    pub fn payload_type(&self) -> PayloadType {
        self.payload_type
    }

    /// Turns the database's refusals that have a known fix into errors that name it.
    fn explain(&self, error: sqlx::Error) -> Error {
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|code| code.into_owned());
        match code.as_deref() {
            // undefined_table
            Some("42P01") => Error::TableMissing {
                table: self.table.clone(),
            },
            // datatype_mismatch: the only typed column that differs between tables is
            // the payload (jsonb or bytea).
            Some("42804") => Error::PayloadTypeMismatch {
                table: self.table.clone(),
                writer: self.payload_type,
                source: error,
            },
            _ => Error::Database(error),
        }
    }
}

/// Writes one event into `public.outbox` with the caller's executor (see [`OutboxWriter`]).
pub async fn write<'e, E>(executor: E, event: &Event) -> Result<(), Error>
where
    E: PgExecutor<'e>,
{
    default_writer().write(executor, event).await
}

/// Writes events into `public.outbox` with the caller's executor (see [`OutboxWriter`]).
pub async fn write_all<'e, E>(executor: E, events: &[Event]) -> Result<(), Error>
where
    E: PgExecutor<'e>,
{
    default_writer().write_all(executor, events).await
}

/// The writer for `public.outbox`, built once: its insert statement is rendered from the
/// table name, which need not happen on every write.
fn default_writer() -> &'static OutboxWriter {
    static WRITER: std::sync::OnceLock<OutboxWriter> = std::sync::OnceLock::new();
    WRITER.get_or_init(OutboxWriter::default)
}

/// The `traceparent` (and `tracestate`) of the caller's current OpenTelemetry span, or
/// nothing when there is none: the events of one write continue the trace of the code
/// that wrote them, with no call of the application's own.
fn current_trace_headers() -> Vec<(String, String)> {
    use opentelemetry::trace::TraceContextExt;
    let context = opentelemetry::Context::current();
    let Some(parent) = TraceParent::of_context(&context) else {
        return Vec::new();
    };
    let mut headers = vec![(TRACEPARENT.to_string(), parent.to_string())];
    let state = context.span().span_context().trace_state().header();
    if !state.is_empty() {
        headers.push((TRACESTATE.to_string(), state));
    }
    headers
}
