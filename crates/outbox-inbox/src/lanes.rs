//! Per-key lanes, and what happens to one message in its lane.
//!
//! Every (topic, partition, key) with work has a lane: a queue and one task that takes
//! its messages one at a time, so an aggregate's events are applied in partition
//! order, while different aggregates run concurrently (up to the concurrency limit).
//! A message that is retrying holds up its own lane only.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use sqlx::PgPool;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};
use uuid::Uuid;

use crate::dead_letter::DeadLetters;
use crate::handler::{Handler, HandlerError};
use crate::message::InboxMessage;
use crate::offsets::PartitionState;
use crate::settings::Settings;
use crate::stats::{InFlight, InboxStats};
use crate::table::Statements;

/// SQLSTATE 25P02: a statement failed earlier in this transaction.
const IN_FAILED_TRANSACTION: &str = "25P02";

/// One received message on its way through a lane.
pub(crate) struct Work {
    pub(crate) message: InboxMessage,
    /// Why the message has no usable event id, if it has none.
    pub(crate) id_problem: Option<String>,
    pub(crate) partition: Arc<PartitionState>,
    pub(crate) _in_flight: InFlight,
}

type LaneKey = (String, i32, Option<Vec<u8>>);

/// Everything the lanes share.
pub(crate) struct Engine {
    pub(crate) settings: Settings,
    pub(crate) stats: InboxStats,
    /// Cancelled on shutdown: queued work is dropped, retries stop, running handlers
    /// get the shutdown grace period.
    pub(crate) stopping: CancellationToken,
    pool: PgPool,
    handler: Box<dyn Handler>,
    statements: Statements,
    dead_letters: DeadLetters,
    lanes: Mutex<HashMap<LaneKey, VecDeque<Work>>>,
    concurrency: Semaphore,
    runtime: Handle,
}

enum Attempt {
    Processed,
    Duplicate,
}

enum AttemptError {
    /// The handler failed (or left its transaction failed): counts as an attempt.
    Handler(HandlerError),
    /// The database failed around the handler (begin, claim, commit): retried without
    /// counting, since no attempt of the handler was judged.
    Database(sqlx::Error),
}

impl Engine {
    pub(crate) fn new(
        settings: Settings,
        stats: InboxStats,
        pool: PgPool,
        handler: Box<dyn Handler>,
        dead_letters: DeadLetters,
        runtime: Handle,
    ) -> Engine {
        Engine {
            statements: Statements::new(&settings.table),
            concurrency: Semaphore::new(settings.concurrency),
            stopping: CancellationToken::new(),
            lanes: Mutex::new(HashMap::new()),
            settings,
            stats,
            pool,
            handler,
            dead_letters,
            runtime,
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<LaneKey, VecDeque<Work>>> {
        self.lanes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `work` behind the earlier messages of its key; starts the lane's task if
    /// the lane was idle.
    pub(crate) fn dispatch(self: &Arc<Self>, work: Work) {
        let key: LaneKey = (
            work.message.topic.clone(),
            work.message.partition,
            work.message.key.clone(),
        );
        let mut lanes = self.lanes();
        if let Some(queue) = lanes.get_mut(&key) {
            queue.push_back(work);
            return;
        }
        lanes.insert(key.clone(), VecDeque::from([work]));
        drop(lanes);
        let engine = self.clone();
        self.runtime.spawn(engine.run_lane(key));
    }

    /// The lane's task: takes its messages in order until the queue is empty. The lane
    /// exists exactly as long as its task, so a message queued while the task runs is
    /// always picked up.
    async fn run_lane(self: Arc<Self>, key: LaneKey) {
        loop {
            let work = {
                let mut lanes = self.lanes();
                match lanes.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(work) => work,
                    None => {
                        lanes.remove(&key);
                        return;
                    }
                }
            };
            self.process(work).await;
        }
    }

    async fn process(&self, mut work: Work) {
        let partition = work.partition.clone();
        // Not started: dropped (with its in-flight count) and left pending, so its
        // offset is not committed and whoever owns the partition next reads it again.
        if self.stopping.is_cancelled() || !partition.try_start() {
            return;
        }
        let done = self.deliver(&mut work).await;
        partition.finish(work.message.offset, done);
    }

    /// Takes one message to a durable outcome: processed, duplicate or dead-lettered
    /// (true), or abandoned because its partition was revoked or the inbox is stopping
    /// (false).
    async fn deliver(&self, work: &mut Work) -> bool {
        if let Some(problem) = work.id_problem.take() {
            return self.dead_letter(work, None, &problem, 0).await;
        }
        let id = work.message.id;
        let mut failed_attempts = 0u32;
        let mut database_failures = 0u32;
        loop {
            let outcome = {
                let _permit = tokio::select! {
                    permit = self.concurrency.acquire() => permit.expect("the semaphore is never closed"),
                    _ = self.stop_signal(&work.partition) => return false,
                };
                work.message.attempt = failed_attempts + 1;
                tokio::select! {
                    biased;
                    outcome = self.attempt(&work.message) => outcome,
                    _ = self.abandon_signal(&work.partition) => {
                        warn!(
                            topic = %work.message.topic,
                            partition = work.message.partition,
                            offset = work.message.offset,
                            %id,
                            "handler abandoned: it did not finish within the grace period of a revocation or shutdown; its transaction is rolled back and the message will be replayed"
                        );
                        return false;
                    }
                }
            };
            let delay = match outcome {
                Ok(Attempt::Processed) => {
                    self.stats.add_processed();
                    return true;
                }
                Ok(Attempt::Duplicate) => {
                    self.stats.add_duplicate();
                    debug!(
                        topic = %work.message.topic,
                        partition = work.message.partition,
                        offset = work.message.offset,
                        %id,
                        "duplicate: the id is already in the inbox; skipped"
                    );
                    return true;
                }
                Err(AttemptError::Handler(err)) => {
                    failed_attempts += 1;
                    self.stats.add_handler_error();
                    if err.is_permanent() || failed_attempts >= self.settings.max_attempts {
                        return self
                            .dead_letter(work, Some(id), &err.to_string(), failed_attempts)
                            .await;
                    }
                    let delay = self.settings.backoff(failed_attempts);
                    warn!(
                        topic = %work.message.topic,
                        partition = work.message.partition,
                        offset = work.message.offset,
                        %id,
                        attempt = failed_attempts,
                        max_attempts = self.settings.max_attempts,
                        error = %err,
                        ?delay,
                        "handler failed; retrying after the backoff (later messages of this key wait)"
                    );
                    delay
                }
                Err(AttemptError::Database(err)) => {
                    database_failures += 1;
                    let delay = self.settings.backoff(database_failures);
                    warn!(
                        topic = %work.message.topic,
                        partition = work.message.partition,
                        offset = work.message.offset,
                        %id,
                        error = %err,
                        ?delay,
                        "database error around the handler; retrying (not counted as an attempt)"
                    );
                    delay
                }
            };
            if !self.sleep_unless_stopped(delay, &work.partition).await {
                return false;
            }
        }
    }

    /// One attempt in one transaction: claim the id in the inbox, run the handler,
    /// commit both.
    async fn attempt(&self, message: &InboxMessage) -> Result<Attempt, AttemptError> {
        let mut tx = self.pool.begin().await.map_err(AttemptError::Database)?;
        let claimed = sqlx::query(sqlx::AssertSqlSafe(String::from(&self.statements.claim)))
            .bind(&self.settings.consumer)
            .bind(message.id)
            .execute(&mut *tx)
            .await
            .map_err(AttemptError::Database)?
            .rows_affected();
        if claimed == 0 {
            let _ = tx.rollback().await;
            return Ok(Attempt::Duplicate);
        }
        // The handler runs in a span of the trace the message carries (its
        // `traceparent`), with nothing to do on the application's side.
        let span = handler_span(message, &self.settings.consumer);
        let handled = opentelemetry::trace::FutureExt::with_context(
            AssertUnwindSafe(self.handler.handle(&mut tx, message)).catch_unwind(),
            span.clone(),
        )
        .await;
        let failure = match handled {
            Ok(Ok(())) => None,
            Ok(Err(err)) => Some(err),
            Err(panic) => Some(HandlerError::msg(format!(
                "the handler panicked: {}",
                panic_text(panic.as_ref())
            ))),
        };
        {
            use opentelemetry::trace::{Status, TraceContextExt};
            let span = span.span();
            if let Some(err) = &failure {
                span.set_status(Status::error(err.to_string()));
            }
            span.end();
        }
        if let Some(err) = failure {
            let _ = tx.rollback().await;
            return Err(AttemptError::Handler(err));
        }
        // PostgreSQL answers COMMIT of a failed transaction with a silent rollback: a
        // handler that ignored an SQL error would lose the message without this probe.
        if let Err(err) = sqlx::query("SELECT 1").execute(&mut *tx).await {
            let _ = tx.rollback().await;
            let failed_tx = err
                .as_database_error()
                .and_then(|db| db.code())
                .is_some_and(|code| code == IN_FAILED_TRANSACTION);
            return Err(if failed_tx {
                AttemptError::Handler(HandlerError::msg(
                    "the handler returned Ok, but a statement in its transaction had failed; \
                     return that SQL error instead of ignoring it",
                ))
            } else {
                AttemptError::Database(err)
            });
        }
        tx.commit().await.map_err(AttemptError::Database)?;
        Ok(Attempt::Processed)
    }

    /// Sends the message to the dead-letter topic, then records its id (if it has one)
    /// as dead-lettered, so that a replay does not send it again.
    async fn dead_letter(
        &self,
        work: &Work,
        id: Option<Uuid>,
        reason: &str,
        attempts: u32,
    ) -> bool {
        let message = &work.message;
        let topic = self.dead_letters.topic_for(&message.topic);
        error!(
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            id = ?id,
            attempts,
            reason,
            dead_letter_topic = %topic,
            "dead-lettering the message; consumption goes on"
        );
        let mut failures = 0;
        loop {
            let sent = tokio::select! {
                biased;
                sent = self.dead_letters.send(message, reason, attempts) => sent,
                _ = self.abandon_signal(&work.partition) => return false,
            };
            let Err(err) = sent else { break };
            failures += 1;
            let delay = self.settings.backoff(failures);
            error!(
                topic = %message.topic,
                partition = message.partition,
                offset = message.offset,
                dead_letter_topic = %topic,
                error = %err,
                ?delay,
                "cannot write to the dead-letter topic; retrying (this key waits; check that the topic exists and the producer may write to it)"
            );
            if !self.sleep_unless_stopped(delay, &work.partition).await {
                return false;
            }
        }
        if let Some(id) = id {
            let mut failures = 0;
            loop {
                let recorded = sqlx::query(sqlx::AssertSqlSafe(String::from(
                    &self.statements.dead_letter,
                )))
                .bind(&self.settings.consumer)
                .bind(id)
                .execute(&self.pool)
                .await;
                let Err(err) = recorded else { break };
                failures += 1;
                let delay = self.settings.backoff(failures);
                warn!(%id, error = %err, ?delay, "cannot record the dead letter in the inbox; retrying");
                if !self.sleep_unless_stopped(delay, &work.partition).await {
                    return false;
                }
            }
        }
        self.stats.add_dead_lettered();
        true
    }

    /// Resolves when the partition is revoked or the inbox stops.
    async fn stop_signal(&self, partition: &PartitionState) {
        tokio::select! {
            _ = partition.revoked().cancelled() => {}
            _ = self.stopping.cancelled() => {}
        }
    }

    /// Resolves a grace period after [`Engine::stop_signal`]: the time a running
    /// handler gets to finish.
    async fn abandon_signal(&self, partition: &PartitionState) {
        let grace = tokio::select! {
            _ = partition.revoked().cancelled() => self.settings.revoke_timeout,
            _ = self.stopping.cancelled() => self.settings.shutdown_timeout,
        };
        tokio::time::sleep(grace).await;
    }

    /// Sleeps `delay`; false if the partition was revoked or the inbox stopped first.
    async fn sleep_unless_stopped(&self, delay: Duration, partition: &PartitionState) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.stop_signal(partition) => false,
        }
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(not a string)"
    }
}

/// A span for one handler run, child of the message's `traceparent` (a root span when
/// it has none). Costs nothing when the application installed no tracer provider.
fn handler_span(message: &InboxMessage, consumer: &str) -> opentelemetry::Context {
    use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
    use opentelemetry::KeyValue;
    use outbox_core::{TraceParent, TRACEPARENT, TRACESTATE};
    let parent = message
        .header_str(TRACEPARENT)
        .and_then(TraceParent::parse)
        .map(|p| p.to_context(message.header_str(TRACESTATE)))
        .unwrap_or_default();
    let tracer = opentelemetry::global::tracer("outbox-inbox");
    let span = tracer
        .span_builder(format!("process {}", message.topic))
        .with_kind(SpanKind::Consumer)
        .with_attributes([
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.destination.name", message.topic.clone()),
            KeyValue::new("messaging.consumer.group.name", consumer.to_string()),
            KeyValue::new("messaging.message.id", message.id.to_string()),
        ])
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}
