use std::sync::Arc;
use std::time::Duration;

use outbox_core::TableRef;
use rdkafka::consumer::BaseConsumer;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::consumer::{poll_until_shutdown, InboxContext};
use crate::dead_letter::DeadLetters;
use crate::lanes::Engine;
use crate::settings::{InboxBuilder, Settings};
use crate::table::Statements;
use crate::{Handler, InboxError, InboxStats};

/// An idempotent Kafka consumer that keeps its state in PostgreSQL. See the crate
/// documentation.
#[derive(Debug)]
pub struct Inbox {
    pub(crate) pool: PgPool,
    pub(crate) settings: Settings,
    pub(crate) stats: InboxStats,
}

impl Inbox {
    /// Starts the settings of an inbox: the pool its transactions run on, the Kafka
    /// brokers (`host:port,...`), the consumer group, and the consumer name under which
    /// its inbox rows are kept (usually the service's name; every instance of the
    /// service uses the same one).
    ///
    /// ```no_run
    /// use outbox_inbox::{Inbox, TableRef};
    ///
    /// # fn example(pool: outbox_inbox::sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let inbox = Inbox::builder(pool, "127.0.0.1:9092", "billing", "billing")
    ///     .topics(["outbox.event.order", "outbox.event.refund"])
    ///     .table(TableRef::new("billing", "inbox")?) // default: public.outbox_inbox
    ///     .static_member("billing-1") // a restarted instance gets its partitions at once
    ///     .build()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(
        pool: PgPool,
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        consumer_name: impl Into<String>,
    ) -> InboxBuilder {
        InboxBuilder::new(pool, brokers.into(), group_id.into(), consumer_name.into())
    }

    /// Live counters; clone before [`Inbox::run`].
    pub fn stats(&self) -> InboxStats {
        self.stats.clone()
    }

    /// The inbox table this inbox records event ids in.
    pub fn table(&self) -> &TableRef {
        &self.settings.table
    }

    /// Creates the inbox table if needed; see [`crate::migrate`].
    pub async fn migrate(&self) -> Result<(), InboxError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|source| InboxError::Database {
                doing: "connecting to migrate the inbox table",
                source,
            })?;
        crate::migrate(&mut conn, &self.settings.table).await
    }

    /// Deletes this consumer's inbox rows older than the retention now (the background
    /// purge of [`Inbox::run`] does the same periodically). Returns how many.
    pub async fn purge_expired(&self) -> Result<u64, InboxError> {
        let Some(retention) = crate::retention::resolve(&self.settings).await? else {
            return Ok(0);
        };
        crate::purge_expired(
            &self.pool,
            &self.settings.table,
            &self.settings.consumer,
            retention,
        )
        .await
        .map_err(|source| InboxError::Database {
            doing: "purging expired inbox rows",
            source,
        })
    }

    /// Consumes until `shutdown` is cancelled, then stops fetching, lets running
    /// handlers finish (within the shutdown timeout), commits the finished offsets and
    /// returns `Ok`.
    ///
    /// For each message: in one transaction, the event id is inserted into the inbox
    /// table and `handler` runs; an id already there skips the handler. The Kafka offset
    /// is committed only after that transaction committed.
    ///
    /// # Errors
    ///
    /// At start: the inbox table is missing, the brokers are unreachable, a dead-letter
    /// topic does not exist. Later: a fatal consumer error. Handler failures are not
    /// errors here: they are retried, then dead-lettered.
    ///
    /// # Example: stop on SIGTERM or Ctrl-C
    /// ```no_run
    /// use outbox_inbox::{handler_fn, CancellationToken, HandlerError, Inbox};
    ///
    /// # async fn example(inbox: Inbox) -> Result<(), Box<dyn std::error::Error>> {
    /// let shutdown = CancellationToken::new();
    /// let on_signal = shutdown.clone();
    /// tokio::spawn(async move {
    ///     let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    ///         .expect("a SIGTERM handler");
    ///     tokio::select! {
    ///         _ = term.recv() => {}
    ///         _ = tokio::signal::ctrl_c() => {}
    ///     }
    ///     on_signal.cancel();
    /// });
    /// let stats = inbox.stats();
    /// let handler = handler_fn(|_tx, message| {
    ///     Box::pin(async move {
    ///         println!("{} {}", message.id(), message.event_type().unwrap_or("?"));
    ///         Ok::<_, HandlerError>(())
    ///     })
    /// });
    /// inbox.run(handler, shutdown).await?; // Ok after a clean stop
    /// println!("{stats:?}");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn run<H: Handler>(
        self,
        handler: H,
        shutdown: CancellationToken,
    ) -> Result<(), InboxError> {
        let statements = Statements::new(&self.settings.table);
        sqlx::query(sqlx::AssertSqlSafe(String::from(&statements.probe)))
            .execute(&self.pool)
            .await
            .map_err(|source| InboxError::MissingTable {
                table: self.settings.table.qualified(),
                source,
            })?;

        check_brokers(&self.settings).await?;
        if self.settings.create_dead_letter_topics {
            create_dead_letter_topics(&self.settings).await?;
        }
        // Refuses a retention shorter than the topics keep messages, before consuming.
        let retention = crate::retention::resolve(&self.settings).await?;
        let dead_letters = DeadLetters::new(&self.settings)?;
        let engine = Arc::new(Engine::new(
            self.settings.clone(),
            self.stats.clone(),
            self.pool.clone(),
            Box::new(handler),
            dead_letters,
            tokio::runtime::Handle::current(),
        ));
        let consumer: BaseConsumer<InboxContext> = self
            .settings
            .consumer_config()
            .create_with_context(InboxContext::new(engine.clone()))
            .map_err(|err| self.settings.config_error(err))?;

        // Dropping this future (instead of cancelling `shutdown`) stops the inbox too.
        let shutdown = shutdown.child_token();
        let _stop_on_drop = shutdown.clone().drop_guard();
        let purge_stop = CancellationToken::new();
        let _stop_purge_on_drop = purge_stop.clone().drop_guard();
        let purge = retention.map(|retention| {
            tokio::spawn(purge_periodically(
                self.pool.clone(),
                self.settings.clone(),
                retention,
                purge_stop.clone(),
            ))
        });

        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("outbox-inbox-poll".into())
            .spawn(move || {
                let _ = done_tx.send(poll_until_shutdown(consumer, shutdown));
            });
        let result = match thread {
            Ok(_) => done_rx.await.unwrap_or(Err(InboxError::PollThreadFailed)),
            Err(error) => {
                warn!(%error, "cannot start the polling thread");
                Err(InboxError::PollThreadFailed)
            }
        };
        // Lanes that were abandoned may still hold work; stop them too.
        engine.stopping.cancel();
        purge_stop.cancel();
        if let Some(purge) = purge {
            let _ = purge.await;
        }
        result
    }
}

/// Deletes expired inbox rows every `purge_interval`, starting at once.
async fn purge_periodically(
    pool: PgPool,
    settings: Settings,
    retention: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(settings.purge_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let purged = tokio::select! {
            _ = stop.cancelled() => return,
            purged = crate::purge_expired(&pool, &settings.table, &settings.consumer, retention) => purged,
        };
        match purged {
            Ok(0) => debug!("inbox purge: nothing expired"),
            Ok(deleted) => info!(deleted, ?retention, "inbox purge: expired rows deleted"),
            Err(error) => warn!(%error, "inbox purge failed; retried at the next interval"),
        }
    }
}

/// Fails fast, with what to change, when the brokers cannot be reached or refuse the
/// inbox (TLS, SASL, plaintext to a TLS listener).
async fn check_brokers(settings: &crate::settings::Settings) -> Result<(), InboxError> {
    let config = settings.admin_config();
    let redactor = settings.redactor();
    let brokers = settings.brokers.clone();
    let checked = tokio::task::spawn_blocking(move || {
        outbox_kafka::check_connection(&config, &redactor, &brokers, BROKER_CHECK_TIMEOUT)
    })
    .await
    .expect("the connection check does not panic");
    match checked {
        Ok(()) => Ok(()),
        Err(outbox_kafka::ConnectError::Refused {
            brokers,
            hint,
            detail,
        }) => Err(InboxError::KafkaRefused {
            brokers,
            hint,
            detail,
        }),
        Err(other) => Err(InboxError::KafkaUnreachable(other.to_string())),
    }
}

/// Creates the dead-letter topics that do not exist yet, each with as many partitions as
/// its source topic (the relay's default, 3, for a source not created yet).
async fn create_dead_letter_topics(settings: &crate::settings::Settings) -> Result<(), InboxError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::error::RDKafkaErrorCode;
    let admin: AdminClient<outbox_kafka::QuietLog> = settings
        .admin_config()
        .create_with_context(outbox_kafka::QuietLog::redacting(settings.redactor()))
        .map_err(|err| settings.config_error(err))?;
    let admin = std::sync::Arc::new(admin);
    let reader = admin.clone();
    let metadata = tokio::task::spawn_blocking(move || {
        reader.inner().fetch_metadata(None, BROKER_CHECK_TIMEOUT)
    })
    .await
    .expect("the metadata request does not panic")
    .map_err(|source| InboxError::BrokersUnreachable {
        brokers: settings.brokers.clone(),
        source,
    })?;
    let partitions_of = |topic: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
    };
    let mut wanted: Vec<(String, i32)> = Vec::new();
    for topic in &settings.topics {
        let dead_letters = settings.dead_letter_topic_for(topic);
        if partitions_of(&dead_letters).is_none() && !wanted.iter().any(|(t, _)| *t == dead_letters)
        {
            wanted.push((dead_letters, partitions_of(topic).unwrap_or(3)));
        }
    }
    if wanted.is_empty() {
        return Ok(());
    }
    let new_topics: Vec<NewTopic<'_>> = wanted
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(BROKER_CHECK_TIMEOUT));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|source| InboxError::BrokersUnreachable {
            brokers: settings.brokers.clone(),
            source,
        })?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, "created the dead-letter topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(InboxError::CreateDeadLetterTopic {
                    topic,
                    reason: format!("{code:?} ({code})"),
                })
            }
        }
    }
    Ok(())
}

/// How long the start-up check waits for the brokers.
const BROKER_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
