//! The polling relay's view of the outbox table.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use std::collections::HashSet;

use outbox_core::{Action, DeadLetterPolicy, StoredEvent, TableRef};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{Acquire, PgConnection, Row};
use uuid::Uuid;

use crate::schema::check_version;
use crate::{Error, PayloadType};

/// What happens to a row once the broker acknowledged its event (`delivery.on_publish`:
/// `"mark"` or `"delete"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnPublish {
    /// Set `published_at`; rows are purged after the retention period.
    #[default]
    Mark,
    /// Delete the row at once.
    Delete,
}

/// Which rows [`PollingStore::unpublished_page`] reads, by the 64-bit id of the
/// transaction that wrote them (compared with the row's `xmin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WrittenBy {
    /// Every pending row, whichever transaction wrote it.
    Any,
    /// Rows written by transactions older than this transaction id (the rows a
    /// replication slot created at that point does not hold).
    Below(u64),
    /// Rows written by this transaction or later ones (to publish again after a
    /// replication slot was lost and recreated).
    AtOrAfter(u64),
}

/// Counts an operator looks at first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxStats {
    /// Rows neither published nor dead-lettered.
    pub pending: i64,
    /// Age of the oldest pending row, in seconds (0 when none).
    pub oldest_pending_age_secs: f64,
    /// Pending rows waiting for a retry after a failed delivery.
    pub retrying: i64,
    /// Dead-lettered rows, waiting for an operator (`outbox dead-letters`).
    pub dead_lettered: i64,
}

/// A dead-lettered event and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The event id.
    pub id: Uuid,
    /// The `aggregatetype` column.
    pub aggregate_type: String,
    /// The `aggregateid` column.
    pub aggregate_id: String,
    /// The `type` column.
    pub event_type: String,
    /// Delivery attempts made.
    pub attempts: i32,
    /// Why the relay gave up on it, as recorded with the dead letter.
    pub last_error: Option<String>,
    /// When the application wrote the event.
    pub created_at: DateTime<Utc>,
    /// When the relay dead-lettered it.
    pub dead_lettered_at: DateTime<Utc>,
    /// When an operator skipped it (`outbox dead-letters skip`): its aggregate's later
    /// events no longer wait for it.
    pub skipped_at: Option<DateTime<Utc>>,
}

/// A pending event that waits in the table: for a retry after a failed delivery, or
/// (CDC) behind an earlier event of its aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryingEvent {
    /// The event id.
    pub id: Uuid,
    /// The `aggregatetype` column.
    pub aggregate_type: String,
    /// The `aggregateid` column.
    pub aggregate_id: String,
    /// The `type` column.
    pub event_type: String,
    /// Delivery attempts made.
    pub attempts: i32,
    /// The last delivery error; `None` for an event that only waits behind its
    /// aggregate.
    pub last_error: Option<String>,
    /// When the relay tries it next (or looks again).
    pub next_attempt_at: DateTime<Utc>,
}

/// A row to keep waiting in the table (CDC): an event of a parked aggregate, or one
/// whose delivery failed.
#[derive(Debug, Clone, Copy)]
pub struct Waiting<'a> {
    /// The event, as read from the replication stream.
    pub event: &'a StoredEvent,
    /// The attempt count to record.
    pub attempts: i32,
    /// After a failed attempt: how long to wait before the next. `None` for an event
    /// that only waits behind its aggregate's earlier ones.
    pub backoff: Option<Duration>,
    /// The delivery error, recorded as the row's last error.
    pub error: Option<&'a str>,
}

/// What an event inserted again becomes.
#[derive(Debug, Clone, Copy)]
enum Reinserted {
    DeadLetter,
    /// Waiting in the table, due after `backoff`.
    Waiting {
        backoff: Duration,
    },
}

/// An aggregate: its `aggregatetype` and `aggregateid`.
pub type Aggregate = (String, String);

/// The queries of the polling relay, prepared for one outbox table.
#[derive(Debug, Clone)]
pub struct PollingStore {
    table: TableRef,
    payload_type: PayloadType,
    /// The fetch query, by [`Fetch`] and dead-letter policy (see [`fetch_sql`]).
    fetch_sql: [String; 4],
}

/// Which rows a fetch takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// Every pending row (polling).
    Pending,
    /// Only rows waiting in the table (CDC: parked aggregates, retried dead letters).
    Waiting,
}

const PENDING: &str = "published_at IS NULL AND dead_lettered_at IS NULL";

impl PollingStore {
    /// Checks the table (exists, migrated, readable and writable by this role) and
    /// prepares the store's queries for its payload type.
    pub async fn open(conn: &mut PgConnection, table: TableRef) -> Result<Self, Error> {
        Self::open_checking(conn, table, &["SELECT", "UPDATE", "DELETE"]).await
    }

    /// Opens the table to read it only (status, listing dead letters): a monitoring
    /// role needs nothing but SELECT on it.
    pub async fn open_read_only(conn: &mut PgConnection, table: TableRef) -> Result<Self, Error> {
        Self::open_checking(conn, table, &["SELECT"]).await
    }

    async fn open_checking(
        conn: &mut PgConnection,
        table: TableRef,
        privileges: &[&'static str],
    ) -> Result<Self, Error> {
        check_version(conn, &table).await?;
        check_table_privileges(conn, &table, privileges).await?;
        let payload_type: String = sqlx::query_scalar(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = to_regclass($1) AND attname = 'payload' AND NOT attisdropped",
        )
        .bind(table.qualified())
        .fetch_one(&mut *conn)
        .await?;
        let payload_type = if payload_type == "bytea" {
            PayloadType::Bytea
        } else {
            PayloadType::Jsonb
        };
        Ok(PollingStore {
            fetch_sql: [
                fetch_sql(&table, payload_type, Fetch::Pending, DeadLetterPolicy::Park),
                fetch_sql(&table, payload_type, Fetch::Pending, DeadLetterPolicy::Skip),
                fetch_sql(&table, payload_type, Fetch::Waiting, DeadLetterPolicy::Park),
                fetch_sql(&table, payload_type, Fetch::Waiting, DeadLetterPolicy::Skip),
            ],
            payload_type,
            table,
        })
    }

    /// The outbox table this store reads and updates.
    pub fn table(&self) -> &TableRef {
        &self.table
    }

    /// The next events to publish, at most `limit`, in `seq` order: every pending row
    /// ([`Fetch::Pending`], polling) or only those waiting in the table
    /// ([`Fetch::Waiting`], CDC).
    ///
    /// Selects by state (unpublished), never by a high-water mark, so a transaction
    /// that commits late with a low `seq` is still found. Skips every parked aggregate:
    /// one with an event waiting for a retry and, with [`DeadLetterPolicy::Park`], one
    /// with a dead letter not yet retried or skipped. Its later events cannot overtake
    /// it; the other aggregates keep flowing.
    ///
    /// At most `limit` rows, and no more than `max_bytes` of them (by
    /// [`StoredEvent::weight`]): rows are read as they arrive, and the batch ends with
    /// the row that reaches `max_bytes` (so one row heavier than that still makes a
    /// batch of its own). A prefix of the rows in `seq` order is as good a batch as all
    /// of them: the next fetch finds the rest.
    pub async fn fetch(
        &self,
        conn: &mut PgConnection,
        which: Fetch,
        on_dead_letter: DeadLetterPolicy,
        limit: i64,
        max_bytes: u64,
    ) -> Result<Vec<StoredEvent>, Error> {
        self.fetch_excluding(conn, which, on_dead_letter, limit, max_bytes, &[])
            .await
    }

    /// [`fetch`](Self::fetch), leaving out the rows whose `seq` is in `in_flight`: the
    /// relay's pipeline fetches the next batch while the last one, still pending in the
    /// table, is being published.
    pub async fn fetch_excluding(
        &self,
        conn: &mut PgConnection,
        which: Fetch,
        on_dead_letter: DeadLetterPolicy,
        limit: i64,
        max_bytes: u64,
        in_flight: &[i64],
    ) -> Result<Vec<StoredEvent>, Error> {
        let index = match (which, on_dead_letter) {
            (Fetch::Pending, DeadLetterPolicy::Park) => 0,
            (Fetch::Pending, DeadLetterPolicy::Skip) => 1,
            (Fetch::Waiting, DeadLetterPolicy::Park) => 2,
            (Fetch::Waiting, DeadLetterPolicy::Skip) => 3,
        };
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(String::from(&self.fetch_sql[index])))
            .bind(limit)
            .bind(seq_multirange(in_flight))
            .fetch(&mut *conn);
        let mut events = Vec::new();
        let mut bytes = 0;
        while let Some(row) = rows.try_next().await? {
            let event = stored_event(&row)?;
            bytes += event.weight();
            events.push(event);
            if bytes >= max_bytes {
                // The rows left unread are read and dropped by the connection before
                // its next statement, one at a time.
                break;
            }
        }
        Ok(events)
    }

    /// CDC: the next rows after `after_seq` that a replication slot may not hold, in
    /// `seq` order, at most `limit`: rows neither published nor dead-lettered nor
    /// waiting in the table (those are published from there), written by the
    /// transactions that `written` selects. Run inside one REPEATABLE READ
    /// transaction so that the pages come from one snapshot.
    pub async fn unpublished_page(
        &self,
        conn: &mut PgConnection,
        written: WrittenBy,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, Error> {
        let t = self.table.qualified();
        let payload = match self.payload_type {
            PayloadType::Jsonb => "convert_to(o.payload::text, 'UTF8')",
            PayloadType::Bytea => "o.payload",
        };
        // `xmin` is a 32-bit id that wraps; age() compares it with the watermark's low
        // 32 bits the way PostgreSQL does: a row written by a transaction at or after the
        // watermark has an age no larger than the watermark's.
        let (filter, watermark) = match written {
            WrittenBy::Any => ("true", None),
            WrittenBy::Below(xid) => (
                "age(o.xmin) > age(($3::bigint % 4294967296)::text::xid)",
                Some(xid),
            ),
            WrittenBy::AtOrAfter(xid) => (
                "age(o.xmin) <= age(($3::bigint % 4294967296)::text::xid)",
                Some(xid),
            ),
        };
        let sql = format!(
            "SELECT o.seq, o.id, o.aggregatetype, o.aggregateid, o.type,
                    {payload} AS payload, o.headers::text AS headers, o.attempts,
                    o.dead_letter_retried_at IS NOT NULL AS retried
             FROM {t} o
             WHERE o.published_at IS NULL AND o.dead_lettered_at IS NULL AND o.seq > $2
               AND o.next_attempt_at IS NULL
               AND ($3::bigint IS NULL OR {filter})
             ORDER BY o.seq
             LIMIT $1"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(String::from(&sql)))
            .bind(limit)
            .bind(after_seq)
            .bind(watermark.map(|x| x as i64))
            .fetch_all(&mut *conn)
            .await?;
        rows.iter().map(stored_event).collect()
    }

    /// Records the outcome of a batch in one transaction. Returns the number of rows
    /// marked published (or deleted).
    pub async fn apply(
        &self,
        conn: &mut PgConnection,
        actions: &[Action],
        on_publish: OnPublish,
    ) -> Result<u64, Error> {
        let mut published: Vec<Uuid> = Vec::new();
        let mut retry = RowUpdates::default();
        let mut dead = RowUpdates::default();
        for action in actions {
            match action {
                Action::Published { id } => published.push(*id),
                Action::Retry {
                    id,
                    attempts,
                    backoff,
                    error,
                } => retry.push(*id, *attempts, *backoff, error),
                Action::DeadLetter {
                    id,
                    attempts,
                    error,
                } => dead.push(*id, *attempts, Duration::ZERO, error),
            }
        }
        if retry.ids.is_empty() && dead.ids.is_empty() {
            return self.apply_published(conn, &published, on_publish).await;
        }
        let t = self.table.qualified();
        // Every statement below finds its rows by id. With a batch of ids the planner
        // may price a scan of the whole table below a thousand index probes (a table of
        // small rows), and then each batch reads every row ever written: a relay
        // falling behind at a few thousand events per second. Only for this
        // transaction, and sent with its BEGIN (no round trip of its own).
        let mut tx =
            sqlx::Connection::begin_with(conn, "BEGIN; SET LOCAL enable_seqscan = off").await?;
        if on_publish == OnPublish::Delete {
            mark_relay_delete(&mut tx).await?;
        }
        let mut done = 0;
        if !published.is_empty() {
            let sql = match on_publish {
                OnPublish::Mark => format!(
                    "UPDATE {t} SET published_at = now(), next_attempt_at = NULL WHERE id = ANY($1)"
                ),
                OnPublish::Delete => format!("DELETE FROM {t} WHERE id = ANY($1)"),
            };
            done = sqlx::query(sqlx::AssertSqlSafe(String::from(&sql)))
                .bind(&published)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if !retry.ids.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
                "UPDATE {t} SET attempts = u.attempts, last_error = u.error,
                     next_attempt_at = now() + u.backoff_ms * interval '1 millisecond'
                 FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::text[])
                      AS u(id, attempts, backoff_ms, error)
                 WHERE {t}.id = u.id"
            ))))
            .bind(&retry.ids)
            .bind(&retry.attempts)
            .bind(&retry.backoff_ms)
            .bind(&retry.errors)
            .execute(&mut *tx)
            .await?;
        }
        if !dead.ids.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
                "UPDATE {t} SET attempts = u.attempts, last_error = u.error,
                     dead_lettered_at = now(), next_attempt_at = NULL
                 FROM unnest($1::uuid[], $2::int[], $3::text[]) AS u(id, attempts, error)
                 WHERE {t}.id = u.id"
            ))))
            .bind(&dead.ids)
            .bind(&dead.attempts)
            .bind(&dead.errors)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    /// [`PollingStore::apply`] for a batch that was published whole, the common case, in
    /// one round trip: the statements of one simple query run as one transaction, so
    /// the settings are local to it as in `apply`'s (bench/README.md, "Listening only
    /// when idle"). The ids are rendered into the statement: UUIDs, in their fixed
    /// hexadecimal form.
    async fn apply_published(
        &self,
        conn: &mut PgConnection,
        published: &[Uuid],
        on_publish: OnPublish,
    ) -> Result<u64, Error> {
        if published.is_empty() {
            return Ok(0);
        }
        let t = self.table.qualified();
        let ids = uuid_array_literal(published);
        let sql = match on_publish {
            OnPublish::Mark => format!(
                "SET LOCAL enable_seqscan = off;
                 UPDATE {t} SET published_at = now(), next_attempt_at = NULL
                 WHERE id = ANY({ids})"
            ),
            OnPublish::Delete => format!(
                "SET LOCAL enable_seqscan = off;
                 SET LOCAL {RELAY_DELETE} = 'on';
                 DELETE FROM {t} WHERE id = ANY({ids})"
            ),
        };
        Ok(sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(conn)
            .await?
            .rows_affected())
    }

    /// Records an event read from the write-ahead log (CDC mode) as a dead letter. The
    /// row may be gone (writers that insert and delete in one transaction): then it is
    /// inserted again, flagged, so the event and its reason are kept.
    pub async fn record_dead_letter(
        &self,
        conn: &mut PgConnection,
        event: &StoredEvent,
        attempts: i32,
        error: &str,
    ) -> Result<(), Error> {
        let t = self.table.qualified();
        let updated = sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "UPDATE {t} SET dead_lettered_at = now(), attempts = $2, last_error = $3 WHERE id = $1"
        ))))
        .bind(event.id)
        .bind(attempts)
        .bind(error)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if updated > 0 {
            return Ok(());
        }
        self.insert_again(conn, event, attempts, Some(error), Reinserted::DeadLetter)
            .await
    }

    /// Inserts an event read from the write-ahead log again, with its `seq` (its place
    /// among its aggregate's events), when the writer deleted its row.
    async fn insert_again(
        &self,
        conn: &mut PgConnection,
        event: &StoredEvent,
        attempts: i32,
        error: Option<&str>,
        state: Reinserted,
    ) -> Result<(), Error> {
        let t = self.table.qualified();
        let payload = match self.payload_type {
            PayloadType::Jsonb => "convert_from($5, 'UTF8')::jsonb",
            PayloadType::Bytea => "$5",
        };
        let (dead, backoff_ms) = match state {
            Reinserted::DeadLetter => (true, None),
            Reinserted::Waiting { backoff } => (false, Some(backoff.as_millis() as i64)),
        };
        sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "INSERT INTO {t} (id, aggregatetype, aggregateid, type, payload, headers,
                              attempts, last_error, seq, dead_lettered_at, next_attempt_at)
             OVERRIDING SYSTEM VALUE
             VALUES ($1, $2, $3, $4, {payload}, $6, $7, $8, $9,
                     CASE WHEN $10 THEN now() END,
                     now() + $11 * interval '1 millisecond')"
        ))))
        .bind(event.id)
        .bind(&event.aggregate_type)
        .bind(&event.aggregate_id)
        .bind(&event.event_type)
        .bind(&event.payload)
        .bind(headers_json(event))
        .bind(attempts)
        .bind(error)
        .bind(event.seq)
        .bind(dead)
        .bind(backoff_ms)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// CDC: keeps `rows` waiting in the table, to be published from there (see
    /// [`Fetch::Waiting`]) in `seq` order, before the stream moves past them. A row the
    /// writer deleted is inserted again with its `seq`; one that is published or
    /// dead-lettered already is left alone.
    pub async fn keep_waiting(
        &self,
        conn: &mut PgConnection,
        rows: &[Waiting<'_>],
    ) -> Result<(), Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let t = self.table.qualified();
        let ids: Vec<Uuid> = rows.iter().map(|w| w.event.id).collect();
        let attempts: Vec<i32> = rows.iter().map(|w| w.attempts).collect();
        let backoff_ms: Vec<Option<i64>> = rows
            .iter()
            .map(|w| w.backoff.map(|b| b.as_millis() as i64))
            .collect();
        let errors: Vec<Option<&str>> = rows.iter().map(|w| w.error).collect();
        let mut tx = conn.begin().await?;
        sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "UPDATE {t} SET attempts = u.attempts,
                 last_error = coalesce(u.error, {t}.last_error),
                 next_attempt_at = CASE WHEN u.backoff_ms IS NULL
                     THEN coalesce({t}.next_attempt_at, now())
                     ELSE now() + u.backoff_ms * interval '1 millisecond' END
             FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::text[])
                  AS u(id, attempts, backoff_ms, error)
             WHERE {t}.id = u.id AND {t}.published_at IS NULL AND {t}.dead_lettered_at IS NULL"
        ))))
        .bind(&ids)
        .bind(&attempts)
        .bind(&backoff_ms)
        .bind(&errors)
        .execute(&mut *tx)
        .await?;
        let gone: HashSet<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(String::from(&format!(
            "SELECT u.id FROM unnest($1::uuid[]) AS u(id)
             WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE {t}.id = u.id)"
        ))))
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        for row in rows.iter().filter(|w| gone.contains(&w.event.id)) {
            let backoff = row.backoff.unwrap_or_default();
            self.insert_again(
                &mut tx,
                row.event,
                row.attempts,
                row.error,
                Reinserted::Waiting { backoff },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The parked aggregates: those with rows waiting in the table (CDC) and, with
    /// [`DeadLetterPolicy::Park`], those with a dead letter not yet retried or skipped.
    pub async fn parked_aggregates(
        &self,
        conn: &mut PgConnection,
        on_dead_letter: DeadLetterPolicy,
    ) -> Result<HashSet<Aggregate>, Error> {
        let t = self.table.qualified();
        let dead_letters = match on_dead_letter {
            DeadLetterPolicy::Park => format!(
                "UNION SELECT aggregatetype, aggregateid FROM {t}
                 WHERE dead_lettered_at IS NOT NULL AND dead_letter_skipped_at IS NULL"
            ),
            DeadLetterPolicy::Skip => String::new(),
        };
        let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT aggregatetype, aggregateid FROM {t}
             WHERE {PENDING} AND next_attempt_at IS NOT NULL
             {dead_letters}"
        )))
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Skips dead letters (those with the given ids, or all of them when `ids` is
    /// `None`): they stay dead letters, and their aggregates' later events no longer wait
    /// for them. Returns the ids skipped now.
    pub async fn skip_dead_letters(
        &self,
        conn: &mut PgConnection,
        ids: Option<&[Uuid]>,
    ) -> Result<Vec<Uuid>, Error> {
        let t = self.table.qualified();
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "UPDATE {t} SET dead_letter_skipped_at = now()
             WHERE dead_lettered_at IS NOT NULL AND dead_letter_skipped_at IS NULL
               AND ($1::uuid[] IS NULL OR id = ANY($1))
             RETURNING id"
        )))
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?)
    }

    /// CDC mode: deletes at most `limit` rows older than `retention` (dead letters and
    /// rows waiting in the table excepted); returns how many. The log, not the table, is the source there, so rows
    /// only serve audits and the recovery of a vanished slot. Called in a loop of short
    /// statements, never as one unbounded DELETE.
    pub async fn purge_older_than(
        &self,
        conn: &mut PgConnection,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, Error> {
        self.purge_batch(
            conn,
            "dead_lettered_at IS NULL AND (next_attempt_at IS NULL OR published_at IS NOT NULL)
             AND created_at",
            retention,
            limit,
        )
        .await
    }

    /// Deletes at most `limit` published rows older than `retention`; returns how many.
    /// Called in a loop of short statements, never as one unbounded DELETE.
    pub async fn purge_published(
        &self,
        conn: &mut PgConnection,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, Error> {
        self.purge_batch(
            conn,
            "published_at IS NOT NULL AND published_at",
            retention,
            limit,
        )
        .await
    }

    /// One purge statement: rows where `{older} < now() - retention`, at most `limit`,
    /// marked as the relay's own deletes.
    async fn purge_batch(
        &self,
        conn: &mut PgConnection,
        older: &str,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, Error> {
        let t = self.table.qualified();
        let mut tx = conn.begin().await?;
        mark_relay_delete(&mut tx).await?;
        let deleted = sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "DELETE FROM {t} WHERE id IN (
                 SELECT id FROM {t}
                 WHERE {older} < now() - $1 * interval '1 millisecond'
                 LIMIT $2)"
        ))))
        .bind(retention.as_millis() as i64)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }

    /// Dead-lettered rows (an index scan of the dead-letter index).
    pub async fn dead_letter_count(&self, conn: &mut PgConnection) -> Result<i64, Error> {
        Ok(
            sqlx::query_scalar(sqlx::AssertSqlSafe(String::from(&format!(
                "SELECT count(*) FROM {} WHERE dead_lettered_at IS NOT NULL",
                self.table.qualified()
            ))))
            .fetch_one(&mut *conn)
            .await?,
        )
    }

    /// The table's [`OutboxStats`], counted now, in one statement (the relay asks every
    /// few seconds, idle or not).
    pub async fn stats(&self, conn: &mut PgConnection) -> Result<OutboxStats, Error> {
        let t = self.table.qualified();
        let row = sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "SELECT count(*) AS pending,
                    coalesce(extract(epoch FROM now() - min(created_at))::float8, 0) AS oldest,
                    count(*) FILTER (WHERE next_attempt_at IS NOT NULL) AS retrying,
                    (SELECT count(*) FROM {t} WHERE dead_lettered_at IS NOT NULL)
                        AS dead_lettered
             FROM {t} WHERE {PENDING}"
        ))))
        .fetch_one(&mut *conn)
        .await?;
        Ok(OutboxStats {
            pending: row.try_get("pending")?,
            oldest_pending_age_secs: row.try_get::<f64, _>("oldest")?.max(0.0),
            retrying: row.try_get("retrying")?,
            dead_lettered: row.try_get("dead_lettered")?,
        })
    }

    /// Dead letters, oldest first.
    pub async fn dead_letters(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "SELECT id, aggregatetype, aggregateid, type, attempts, last_error, created_at,
                    dead_lettered_at, dead_letter_skipped_at
             FROM {} WHERE dead_lettered_at IS NOT NULL
             ORDER BY dead_lettered_at, seq LIMIT $1",
            self.table.qualified()
        ))))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(DeadLetter {
                    id: row.try_get("id")?,
                    aggregate_type: row.try_get("aggregatetype")?,
                    aggregate_id: row.try_get("aggregateid")?,
                    event_type: row.try_get("type")?,
                    attempts: row.try_get("attempts")?,
                    last_error: row.try_get("last_error")?,
                    created_at: row.try_get("created_at")?,
                    dead_lettered_at: row.try_get("dead_lettered_at")?,
                    skipped_at: row.try_get("dead_letter_skipped_at")?,
                })
            })
            .collect()
    }

    /// Pending events waiting in the table for their next attempt, in `seq` order.
    pub async fn retrying(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> Result<Vec<RetryingEvent>, Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "SELECT id, aggregatetype, aggregateid, type, attempts, last_error, next_attempt_at
             FROM {} WHERE {PENDING} AND next_attempt_at IS NOT NULL
             ORDER BY seq LIMIT $1",
            self.table.qualified()
        ))))
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(RetryingEvent {
                    id: row.try_get("id")?,
                    aggregate_type: row.try_get("aggregatetype")?,
                    aggregate_id: row.try_get("aggregateid")?,
                    event_type: row.try_get("type")?,
                    attempts: row.try_get("attempts")?,
                    last_error: row.try_get("last_error")?,
                    next_attempt_at: row.try_get("next_attempt_at")?,
                })
            })
            .collect()
    }

    /// Puts dead letters back in the queue with a fresh attempt count: those with the
    /// given ids, or all of them when `ids` is `None`. Returns how many.
    ///
    /// The rows are deleted and inserted again, with the same id and `seq`, in one
    /// statement, waiting in the table (`next_attempt_at` set): both modes publish them
    /// from there, before the later events of their aggregate that a parked aggregate
    /// kept waiting. When the dead letter was skipped (or the policy is to skip), those
    /// later events went first: the row keeps `dead_letter_retried_at`, its message the
    /// `outbox.retried-dead-letter` header, and `outbox verify` counts it.
    pub async fn retry_dead_letters(
        &self,
        conn: &mut PgConnection,
        ids: Option<&[Uuid]>,
    ) -> Result<Vec<Uuid>, Error> {
        let t = self.table.qualified();
        let sql = format!(
            "WITH retried AS (
                 DELETE FROM {t}
                 WHERE dead_lettered_at IS NOT NULL AND ($1::uuid[] IS NULL OR id = ANY($1))
                 RETURNING id, aggregatetype, aggregateid, type, payload, headers, created_at, seq
             )
             INSERT INTO {t} (id, aggregatetype, aggregateid, type, payload, headers, created_at,
                              dead_letter_retried_at, next_attempt_at, seq)
             OVERRIDING SYSTEM VALUE
             SELECT id, aggregatetype, aggregateid, type, payload, headers, created_at, now(),
                    now(), seq
             FROM retried ORDER BY seq
             RETURNING id"
        );
        let mut tx = conn.begin().await?;
        mark_relay_delete(&mut tx).await?;
        let retried: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(ids)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(retried)
    }
}

/// The setting, local to a transaction, that marks its deletes as the relay's own for
/// the table's `writer_deletes` trigger (migration 2).
const RELAY_DELETE: &str = "outbox.relay_delete";

/// Marks the transaction's deletes as the relay's own, so that the table's
/// writer-delete trigger does not take them for a writer's.
async fn mark_relay_delete(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("SELECT set_config($1, 'on', true)")
        .bind(RELAY_DELETE)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// When rows of `table` were first deleted by someone other than the relay, if ever.
pub async fn writer_deletes_since(
    conn: &mut PgConnection,
    table: &TableRef,
) -> Result<Option<DateTime<Utc>>, Error> {
    Ok(
        sqlx::query_scalar(sqlx::AssertSqlSafe(String::from(&format!(
            "SELECT first_at FROM {}",
            table.derived_qualified("writer_deletes")
        ))))
        .fetch_optional(&mut *conn)
        .await?
        .flatten(),
    )
}

/// The event's headers as the `headers` column's JSON object, or NULL when none.
fn headers_json(event: &StoredEvent) -> Option<Json<serde_json::Map<String, serde_json::Value>>> {
    let headers: serde_json::Map<String, serde_json::Value> = event
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    (!headers.is_empty()).then_some(Json(headers))
}

fn fetch_sql(
    table: &TableRef,
    payload_type: PayloadType,
    which: Fetch,
    on_dead_letter: DeadLetterPolicy,
) -> String {
    let t = table.qualified();
    let payload = match payload_type {
        PayloadType::Jsonb => "convert_to(o.payload::text, 'UTF8')",
        PayloadType::Bytea => "o.payload",
    };
    let parked_by_dead_letters = match on_dead_letter {
        DeadLetterPolicy::Park => format!(
            "UNION ALL
             SELECT aggregatetype, aggregateid FROM {t}
             WHERE dead_lettered_at IS NOT NULL AND dead_letter_skipped_at IS NULL"
        ),
        DeadLetterPolicy::Skip => String::new(),
    };
    let waiting = match which {
        Fetch::Pending => "",
        Fetch::Waiting => "AND o.next_attempt_at IS NOT NULL",
    };
    format!(
        "WITH blocked AS (
             SELECT aggregatetype, aggregateid FROM {t}
             WHERE {PENDING} AND next_attempt_at > now()
             {parked_by_dead_letters}
         )
         SELECT o.seq, o.id, o.aggregatetype, o.aggregateid, o.type,
                {payload} AS payload, o.headers::text AS headers, o.attempts,
                o.dead_letter_retried_at IS NOT NULL AS retried
         FROM {t} o
         WHERE o.published_at IS NULL AND o.dead_lettered_at IS NULL
           AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now()) {waiting}
           AND NOT EXISTS (SELECT 1 FROM blocked b
                           WHERE b.aggregatetype = o.aggregatetype
                             AND b.aggregateid = o.aggregateid)
           AND NOT ($2::text::int8multirange @> o.seq)
         ORDER BY o.seq
         LIMIT $1"
    )
}

/// `ids` as a `uuid[]` literal of SQL: `'{…,…}'::uuid[]`.
fn uuid_array_literal(ids: &[Uuid]) -> String {
    let mut text = String::with_capacity(ids.len() * 37 + 16);
    text.push_str("'{");
    for (n, id) in ids.iter().enumerate() {
        if n > 0 {
            text.push(',');
        }
        text.push_str(&id.hyphenated().to_string());
    }
    text.push_str("}'::uuid[]");
    text
}

/// `seqs` as the text of an `int8multirange`: one range per run of consecutive values,
/// so the rows of a batch in flight (mostly one run) cost one range test per row.
fn seq_multirange(seqs: &[i64]) -> String {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut text = String::from("{");
    let mut runs = sorted
        .chunk_by(|a, b| a.checked_add(1) == Some(*b))
        .peekable();
    while let Some(run) = runs.next() {
        let (first, last) = (run[0], run[run.len() - 1]);
        text.push_str(&format!("[{first},{last}]"));
        if runs.peek().is_some() {
            text.push(',');
        }
    }
    text.push('}');
    text
}

/// A fetched row as an event. `headers` comes as text and is parsed here, row by row,
/// so one value that cannot be parsed makes that event unreadable (dead-lettered)
/// instead of failing the whole fetch.
fn stored_event(row: &PgRow) -> Result<StoredEvent, Error> {
    let headers: Option<String> = row.try_get("headers")?;
    let (headers, unreadable) = match headers.as_deref().map(|h| parse_headers(h.as_bytes())) {
        None => (Vec::new(), None),
        Some(Ok(headers)) => (headers, None),
        Some(Err(reason)) => (Vec::new(), Some(reason)),
    };
    Ok(StoredEvent {
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        aggregate_type: row.try_get("aggregatetype")?,
        aggregate_id: row.try_get("aggregateid")?,
        event_type: row.try_get("type")?,
        payload: row.try_get("payload")?,
        headers,
        attempts: row.try_get("attempts")?,
        unreadable,
        retried_dead_letter: row.try_get("retried")?,
    })
}

/// The `headers` column's JSON text as header entries (see [`header_entries`]), or why it
/// cannot be read. PostgreSQL's jsonb accepts values that serde_json refuses (numbers
/// beyond f64 such as `1e400`, nesting deeper than 128 levels).
pub fn parse_headers(json: &[u8]) -> Result<Vec<(String, String)>, String> {
    serde_json::from_slice::<serde_json::Value>(json)
        .map(header_entries)
        .map_err(|err| format!("the headers column cannot be read as JSON here ({err})"))
}

/// The `headers` column as header entries: an object's string values as they are, other
/// values as JSON text. Anything but an object is carried whole under `headers`, so a
/// malformed column never drops information.
pub fn header_entries(value: serde_json::Value) -> Vec<(String, String)> {
    match value {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(name, value)| match value {
                serde_json::Value::String(s) => (name, s),
                other => (name, other.to_string()),
            })
            .collect(),
        serde_json::Value::Null => Vec::new(),
        other => vec![("headers".to_string(), other.to_string())],
    }
}

#[derive(Default)]
struct RowUpdates {
    ids: Vec<Uuid>,
    attempts: Vec<i32>,
    backoff_ms: Vec<i64>,
    errors: Vec<String>,
}

impl RowUpdates {
    fn push(&mut self, id: Uuid, attempts: i32, backoff: Duration, error: &str) {
        self.ids.push(id);
        self.attempts.push(attempts);
        self.backoff_ms.push(backoff.as_millis() as i64);
        self.errors.push(error.to_string());
    }
}

/// What CDC mode needs beyond polling's privileges: INSERT on the outbox table (a dead
/// letter whose row the writer deleted is inserted again), SELECT, INSERT, UPDATE on
/// the checkpoint table, and SELECT on the writer-deletes table. Checked at start, so a missing grant is a clear error then,
/// not a write that fails later.
pub async fn check_cdc_privileges(conn: &mut PgConnection, table: &TableRef) -> Result<(), Error> {
    check_table_privileges(conn, table, &["INSERT"]).await?;
    let derived = |suffix: &str| {
        TableRef::new(&table.schema, table.derived_name(suffix))
            .expect("a derived name of a valid table is valid")
    };
    check_table_privileges(
        conn,
        &derived("cdc_checkpoint"),
        &["SELECT", "INSERT", "UPDATE"],
    )
    .await?;
    check_table_privileges(conn, &derived("writer_deletes"), &["SELECT"]).await
}

async fn check_table_privileges(
    conn: &mut PgConnection,
    table: &TableRef,
    privileges: &[&'static str],
) -> Result<(), Error> {
    for &privilege in privileges {
        let granted: bool = sqlx::query_scalar("SELECT has_table_privilege($1, $2)")
            .bind(table.qualified())
            .bind(privilege)
            .fetch_one(&mut *conn)
            .await?;
        if !granted {
            let role: String = sqlx::query_scalar("SELECT current_user::text")
                .fetch_one(&mut *conn)
                .await?;
            return Err(Error::MissingPrivilege {
                role,
                privilege,
                table: table.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_objects_become_entries() {
        let entries = header_entries(serde_json::json!({"traceparent": "00-1", "n": 3}));
        assert!(entries.contains(&("traceparent".into(), "00-1".into())));
        assert!(entries.contains(&("n".into(), "3".into())));
        assert_eq!(header_entries(serde_json::Value::Null), vec![]);
        assert_eq!(
            header_entries(serde_json::json!([1, 2])),
            vec![("headers".to_string(), "[1,2]".to_string())]
        );
    }

    #[test]
    fn seqs_in_flight_become_one_range_per_run() {
        assert_eq!(seq_multirange(&[]), "{}");
        assert_eq!(seq_multirange(&[7]), "{[7,7]}");
        assert_eq!(
            seq_multirange(&[3, 1, 2, 2, 9, 10, 5]),
            "{[1,3],[5,5],[9,10]}"
        );
    }

    #[test]
    fn published_ids_become_one_uuid_array_literal() {
        let a = Uuid::from_u128(0xa1a2a3a4_b1b2_c1c2_d1d2_d3d4d5d6d7d8);
        let b = Uuid::from_u128(1);
        assert_eq!(
            uuid_array_literal(&[a, b]),
            "'{a1a2a3a4-b1b2-c1c2-d1d2-d3d4d5d6d7d8,00000000-0000-0000-0000-000000000001}'::uuid[]"
        );
    }
}
