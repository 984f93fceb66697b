//! The Kafka side: one thread polls the consumer, hands messages to the lanes, commits
//! finished offsets, and serves rebalances.
//!
//! The thread is a plain OS thread, not a tokio task: librdkafka runs the rebalance
//! callback on the thread that polls, and the callback must block until the revoked
//! partitions' handlers are done (or abandoned) and their offsets committed. Blocking a
//! runtime worker for that could starve the very handlers it waits for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::lanes::{Engine, Work};
use crate::message::InboxMessage;
use crate::offsets::PartitionState;
use crate::InboxError;
use outbox_kafka::QuietLog;

/// How long one poll waits for a message; also how quickly shutdown, pausing and
/// periodic commits are noticed.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How long the start-up checks wait for the brokers.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

type PartitionKey = (String, i32);

/// The consumer's context: the partitions assigned to this member and their offsets,
/// and the rebalance callbacks.
pub(crate) struct InboxContext {
    engine: Arc<Engine>,
    partitions: Mutex<HashMap<PartitionKey, Arc<PartitionState>>>,
    /// Set by an assignment, so that the poll loop re-applies its pause state.
    assignment_changed: AtomicBool,
    log: QuietLog,
}

impl InboxContext {
    pub(crate) fn new(engine: Arc<Engine>) -> InboxContext {
        InboxContext {
            log: QuietLog::redacting(engine.settings.redactor()),
            engine,
            partitions: Mutex::new(HashMap::new()),
            assignment_changed: AtomicBool::new(false),
        }
    }

    fn partitions(&self) -> MutexGuard<'_, HashMap<PartitionKey, Arc<PartitionState>>> {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn partition(&self, topic: &str, partition: i32) -> Option<Arc<PartitionState>> {
        self.partitions()
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    fn all_partitions(&self) -> Vec<Arc<PartitionState>> {
        self.partitions().values().cloned().collect()
    }

    fn assign(&self, tpl: &TopicPartitionList) {
        let mut partitions = self.partitions();
        for element in tpl.elements() {
            partitions
                .entry((element.topic().to_string(), element.partition()))
                .or_insert_with(|| {
                    Arc::new(PartitionState::new(element.topic(), element.partition()))
                });
        }
        drop(partitions);
        // The cooperative protocol also reports empty increments.
        if tpl.count() > 0 {
            info!(partitions = %describe(tpl), "partitions assigned");
        }
    }

    /// A partition is leaving: stop its queued work, give its running handlers the
    /// revoke grace period, then commit what finished, synchronously, before librdkafka
    /// lets the partition go.
    fn revoke(&self, consumer: &BaseConsumer<InboxContext>, tpl: &TopicPartitionList) {
        let revoked: Vec<Arc<PartitionState>> = {
            let mut partitions = self.partitions();
            tpl.elements()
                .iter()
                .filter_map(|e| partitions.remove(&(e.topic().to_string(), e.partition())))
                .collect()
        };
        for partition in &revoked {
            partition.revoke();
        }
        if consumer.assignment_lost() {
            // Another member may own them already: a commit could only fail or move
            // its offsets back. Handlers still running roll back after the grace
            // period; the new owner replays their messages.
            warn!(partitions = %describe(tpl), "partitions lost (the group moved on without this member): their unfinished work is abandoned and replayed by the new owner");
            return;
        }
        let deadline =
            Instant::now() + self.engine.settings.revoke_timeout + Duration::from_secs(1);
        let busy: Vec<String> = revoked
            .iter()
            .filter(|p| !p.wait_idle(deadline))
            .map(|p| format!("{}/{}", p.topic, p.partition))
            .collect();
        if !busy.is_empty() {
            warn!(partitions = ?busy, "handlers of revoked partitions still running after the revoke timeout; their offsets are not committed");
        }
        let committed = commit(
            consumer,
            &self.engine.stats,
            &revoked,
            CommitMode::Sync,
            true,
        );
        info!(partitions = %describe(tpl), committed, "partitions revoked; finished offsets committed");
    }
}

impl ClientContext for InboxContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.log.log(level, facility, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason)
    }
}

impl ConsumerContext for InboxContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => self.revoke(consumer, tpl),
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => warn!(%error, "rebalance failed"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.assign(tpl);
            self.assignment_changed.store(true, Ordering::SeqCst);
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let Err(error) = result else {
            return;
        };
        warn!(%error, offsets = %describe(offsets), "offset commit failed; retried at the next commit (meanwhile a restart would replay more messages, which the inbox drops)");
        for element in offsets.elements() {
            if let (Some(partition), Offset::Offset(offset)) = (
                self.partition(element.topic(), element.partition()),
                element.offset(),
            ) {
                partition.commit_failed(offset);
            }
        }
    }
}

/// Commits the committable offset of each of `partitions` (only those that moved,
/// unless `force`). Returns how many partitions were in the commit.
fn commit(
    consumer: &BaseConsumer<InboxContext>,
    stats: &crate::InboxStats,
    partitions: &[Arc<PartitionState>],
    mode: CommitMode,
    force: bool,
) -> usize {
    let mut tpl = TopicPartitionList::new();
    let mut taken = Vec::new();
    for partition in partitions {
        if let Some(offset) = partition.take_commit(force) {
            if let Err(error) = tpl.add_partition_offset(
                &partition.topic,
                partition.partition,
                Offset::Offset(offset),
            ) {
                warn!(%error, "cannot build the offset commit");
                partition.commit_failed(offset);
                continue;
            }
            taken.push((partition, offset));
        }
    }
    if taken.is_empty() {
        return 0;
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => {
            stats.add_offset_commit();
            debug!(offsets = %describe(&tpl), ?mode, "offsets committed");
        }
        Err(error) => {
            warn!(%error, offsets = %describe(&tpl), "offset commit failed; retried at the next commit (meanwhile a restart would replay more messages, which the inbox drops)");
            for (partition, offset) in &taken {
                partition.commit_failed(*offset);
            }
        }
    }
    taken.len()
}

/// `topic/partition@offset, ...` for logs.
fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(offset) => format!("{}/{}@{}", e.topic(), e.partition(), offset),
            _ => format!("{}/{}", e.topic(), e.partition()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the brokers and dead-letter topics, subscribes, then polls until `shutdown`;
/// then drains and commits. Runs on its own thread.
pub(crate) fn poll_until_shutdown(
    consumer: BaseConsumer<InboxContext>,
    shutdown: CancellationToken,
) -> Result<(), InboxError> {
    let context = consumer.context().clone();
    let engine = context.engine.clone();
    let settings = &engine.settings;

    check_topics(&consumer, settings)?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|source| InboxError::Subscribe {
            topics: settings.topics.clone(),
            source,
        })?;
    info!(
        topics = ?settings.topics,
        group = %settings.group_id,
        consumer = %settings.consumer,
        "inbox consuming"
    );

    let mut paused = false;
    let mut last_commit = Instant::now();
    let mut failure = None;
    while !shutdown.is_cancelled() {
        paused = apply_backpressure(&consumer, &context, paused);
        match consumer.poll(POLL_TIMEOUT) {
            Some(Ok(message)) => {
                let (message, id_problem) = InboxMessage::from_kafka(&message);
                let Some(partition) = context.partition(&message.topic, message.partition) else {
                    debug!(topic = %message.topic, partition = message.partition, "message of a partition not assigned (any more); ignored");
                    continue;
                };
                if !partition.accept(message.offset) {
                    continue;
                }
                engine.dispatch(Work {
                    message,
                    id_problem,
                    partition,
                    _in_flight: engine.stats.enter_flight(),
                });
            }
            Some(Err(error)) => {
                if matches!(error, KafkaError::MessageConsumptionFatal(_)) {
                    error!(%error, "fatal consumer error; stopping");
                    failure = Some(error);
                    break;
                }
                if context
                    .log
                    .first_in_interval(format!("poll:{:?}", error.rdkafka_error_code()))
                {
                    warn!(%error, "consumer error (repeats within 30 s are not logged)");
                }
            }
            None => {}
        }
        if last_commit.elapsed() >= settings.commit_interval {
            commit(
                &consumer,
                &engine.stats,
                &context.all_partitions(),
                CommitMode::Async,
                false,
            );
            last_commit = Instant::now();
        }
    }

    drain(&consumer, &context);
    // Dropping the consumer leaves the group: librdkafka revokes the partitions through
    // the same callback (which finds nothing left to wait for).
    drop(consumer);
    info!(stats = ?engine.stats, "inbox stopped");
    match failure {
        Some(error) => Err(InboxError::Consumer(error)),
        None => Ok(()),
    }
}

/// Shutdown: fetch nothing more, drop queued work, let running handlers finish (within
/// the shutdown timeout), then commit synchronously.
fn drain(consumer: &BaseConsumer<InboxContext>, context: &InboxContext) {
    let engine = &context.engine;
    engine.stopping.cancel();
    if let Ok(assignment) = consumer.assignment() {
        if assignment.count() > 0 {
            let _ = consumer.pause(&assignment);
        }
    }
    info!(
        in_flight = engine.stats.in_flight(),
        "inbox stopping: waiting for running handlers"
    );
    let deadline = Instant::now() + engine.settings.shutdown_timeout + Duration::from_secs(5);
    // Keep polling meanwhile, so that rebalances are served; what arrives is not
    // dispatched (and not counted as done).
    while engine.stats.in_flight() > 0 && Instant::now() < deadline {
        let _ = consumer.poll(POLL_TIMEOUT);
    }
    if engine.stats.in_flight() > 0 {
        warn!(
            in_flight = engine.stats.in_flight(),
            "handlers still running after the shutdown timeout; their messages are replayed at the next start"
        );
    }
    commit(
        consumer,
        &engine.stats,
        &context.all_partitions(),
        CommitMode::Sync,
        true,
    );
}

/// Pauses fetching while `max_in_flight` messages are unfinished, and resumes below
/// half of it. Returns whether fetching is paused now.
fn apply_backpressure(
    consumer: &BaseConsumer<InboxContext>,
    context: &InboxContext,
    paused: bool,
) -> bool {
    let in_flight = context.engine.stats.in_flight() as usize;
    let max = context.engine.settings.max_in_flight;
    let changed = context.assignment_changed.swap(false, Ordering::SeqCst);
    let pause = if paused {
        in_flight > max / 2
    } else {
        in_flight >= max
    };
    if pause != paused || changed {
        let Ok(assignment) = consumer.assignment() else {
            return paused;
        };
        if assignment.count() > 0 {
            // librdkafka keeps a partition's pause across a revocation and a new
            // assignment, so both states are re-applied after every assignment.
            let result = if pause {
                consumer.pause(&assignment)
            } else {
                consumer.resume(&assignment)
            };
            if let Err(error) = result {
                warn!(%error, pause, "cannot pause or resume fetching");
                return paused;
            }
        }
        if pause != paused {
            debug!(in_flight, max, pause, "backpressure");
        }
    }
    pause
}

/// Fails fast when the brokers are unreachable or a dead-letter topic is missing.
fn check_topics(
    consumer: &BaseConsumer<InboxContext>,
    settings: &crate::settings::Settings,
) -> Result<(), InboxError> {
    let unreachable = |source| InboxError::BrokersUnreachable {
        brokers: settings.brokers.clone(),
        source,
    };
    let mut dead_letter_topics: Vec<String> = settings
        .topics
        .iter()
        .map(|topic| settings.dead_letter_topic_for(topic))
        .collect();
    dead_letter_topics.sort();
    dead_letter_topics.dedup();
    for topic in settings.topics.iter().chain(&dead_letter_topics) {
        let metadata = consumer
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .map_err(unreachable)?;
        let missing = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .is_none_or(|t| {
                t.error().is_some_and(|e| {
                    RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition
                })
            });
        if !missing {
            continue;
        }
        if dead_letter_topics.contains(topic) {
            return Err(InboxError::MissingDeadLetterTopic {
                topic: topic.clone(),
            });
        }
        warn!(%topic, "the topic does not exist (yet); the inbox consumes it once it is created");
    }
    Ok(())
}
