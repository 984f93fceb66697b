use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::channel::oneshot::Canceled;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use outbox_core::{BoxFuture, CheckError, DeliveryError, DeliveryOutcome, Message, Sink};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{Producer as _, PurgeConfig, ThreadedProducer};
use rdkafka::ClientConfig;
use tracing::{info, warn};

use crate::classify::delivery_error;
use crate::context::QuietLog;
use crate::producer::Producer;
use crate::KafkaSettings;

/// How long reports are still awaited after queued messages were withdrawn at the
/// deadline (in-flight requests may still be acknowledged).
const PURGE_GRACE: Duration = Duration::from_secs(1);

/// Kafka could not be reached or configured.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Settings(#[from] crate::SettingsError),
    /// The text is librdkafka's, with secret values removed.
    #[error("librdkafka refused the configuration: {0}; check kafka.properties")]
    Client(String),
    #[error("cannot reach the Kafka brokers {brokers} within {timeout:?}: {detail}; check kafka_brokers (OUTBOX_KAFKA_BROKERS) and that the broker is running (scripts/services start)")]
    Unreachable {
        brokers: String,
        timeout: Duration,
        detail: String,
    },
    /// The brokers answered but refused us (TLS, SASL, ACLs): retrying cannot help.
    #[error("Kafka brokers {brokers} refused the connection: {hint} ({detail})")]
    Refused {
        brokers: String,
        hint: &'static str,
        detail: String,
    },
}

/// Asks the brokers for metadata until they answer or `timeout` passes, through a
/// short-lived client with `config`'s connection settings. A refusal that retrying
/// cannot fix (TLS, SASL, plaintext to a TLS listener) ends the wait at once, with what
/// to change. Blocks: call it from a blocking task.
pub fn check_connection(
    config: &ClientConfig,
    redactor: &crate::Redactor,
    brokers: &str,
    timeout: Duration,
) -> Result<(), ConnectError> {
    // A threaded producer serves librdkafka's error events on its own thread, so the
    // reasons of a refusal reach the context while we wait (other clients see them
    // only when polled). It sends nothing.
    let mut config = config.clone();
    // Disconnections are logged at Info; rdkafka would otherwise take the level of
    // the `log` crate, which an application logging through `tracing` leaves off.
    config.set_log_level(rdkafka::config::RDKafkaLogLevel::Info);
    let probe: ThreadedProducer<QuietLog> = config
        .create_with_context(QuietLog::redacting(redactor.clone()))
        .map_err(|err| ConnectError::Client(redactor.redact(&err.to_string())))?;
    let started = std::time::Instant::now();
    loop {
        let attempt = probe.client().fetch_metadata(None, CHECK_STEP);
        let recent = probe.context().recent_errors();
        let Err(err) = attempt else {
            return Ok(());
        };
        if let Some((hint, detail)) = recent
            .iter()
            .rev()
            .find_map(|e| crate::refused_connection_hint(e).map(|hint| (hint, e.clone())))
        {
            return Err(ConnectError::Refused {
                brokers: brokers.to_string(),
                hint,
                detail,
            });
        }
        if started.elapsed() >= MISMATCH_AFTER {
            if let Some((hint, detail)) = recent
                .iter()
                .rev()
                .find_map(|e| crate::security::protocol_mismatch_hint(e).map(|h| (h, e.clone())))
            {
                return Err(ConnectError::Refused {
                    brokers: brokers.to_string(),
                    hint,
                    detail,
                });
            }
        }
        if started.elapsed() >= timeout {
            let err = redactor.redact(&err.to_string());
            return Err(ConnectError::Unreachable {
                brokers: brokers.to_string(),
                timeout,
                detail: match recent.last() {
                    Some(latest) => format!("{err}; last client error: {latest}"),
                    None => err,
                },
            });
        }
    }
}

/// The topic the health probe asks the metadata of.
const HEALTH_TOPIC: &str = "outbox-relay-health";

/// One metadata request of [`check_connection`]: short, so a refusal is seen quickly.
const CHECK_STEP: Duration = Duration::from_secs(1);
/// How long connections closed at the first request must go on before the check says
/// the security protocol is wrong (a restarting broker does it briefly).
const MISMATCH_AFTER: Duration = Duration::from_secs(3);

/// Publishes outbox messages to Kafka. See [`outbox_core::Sink`] for the contract.
///
/// With a [`KafkaSettings::transactional_id`], each publish is one Kafka transaction,
/// committed only when every message of it was acknowledged (and aborted otherwise, so
/// its messages are all reported failed and retried). The producer initializes its
/// transactions at the first publish, which only the active relay makes; that fences
/// every earlier producer of the id, so a relay that lost its leadership can no longer
/// make anything visible to `read_committed` consumers.
pub struct KafkaSink {
    settings: KafkaSettings,
    producer: RwLock<Arc<Current>>,
    /// Topics known to exist, so the admin API is asked once per topic.
    known_topics: Mutex<HashSet<String>>,
    /// A newer producer of our transactional id fenced us: publish nothing (above all,
    /// do not initialize transactions again, which would fence the rightful relay) until
    /// [`KafkaSink::lead`] says this relay holds the leadership again.
    fenced: AtomicBool,
}

impl KafkaSink {
    /// Builds the producer. Does not contact the brokers; see
    /// [`KafkaSink::check_connection`].
    ///
    /// No admin client is kept beside it: each librdkafka client has threads of its own
    /// that wake while the relay is idle (rust-rdkafka's admin client polls ten times a
    /// second), a fifth of an idle relay's CPU. Metadata requests go through the
    /// producer; an admin client is made for a topic creation and dropped after it.
    pub fn new(settings: KafkaSettings) -> Result<Self, ConnectError> {
        settings.validate()?;
        if settings.brokers.trim().is_empty() {
            return Err(crate::SettingsError::NoBrokers.into());
        }
        let redactor = settings.redactor();
        let refused = |err: KafkaError| ConnectError::Client(redactor.redact(&err.to_string()));
        let producer = Producer::new(
            &settings.producer_config(),
            QuietLog::redacting(redactor.clone()),
        )
        .map_err(refused)?;
        Ok(KafkaSink {
            settings,
            producer: RwLock::new(Arc::new(Current::new(producer))),
            known_topics: Mutex::new(HashSet::new()),
            fenced: AtomicBool::new(false),
        })
    }

    /// Fetches cluster metadata once, to fail fast with a clear message when the brokers
    /// are unreachable.
    pub async fn check_connection(&self, timeout: Duration) -> Result<(), ConnectError> {
        let settings = self.settings.clone();
        tokio::task::spawn_blocking(move || {
            check_connection(
                &settings.client_config(),
                &settings.redactor(),
                &settings.brokers,
                timeout,
            )
        })
        .await
        .expect("the connection check does not panic")
    }

    fn producer(&self) -> Arc<Current> {
        self.producer.read().expect("producer lock").clone()
    }

    /// Replaces a producer that hit a fatal error (for example a broken idempotence
    /// sequence, or fenced by a newer producer of its transactional id). Its undelivered
    /// messages were already reported failed, so the relay sends them again with the
    /// new producer.
    fn renew_producer_if_fatal(&self, current: &Arc<Current>) {
        if let Some((code, reason)) = current.producer.base().client().fatal_error() {
            let reason = self.settings.redactor().redact(&reason);
            if matches!(
                code,
                RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::Fenced
            ) {
                self.fenced.store(true, Ordering::Release);
                warn!(%reason, transactional_id = ?self.settings.transactional_id, "this relay's Kafka producer was fenced: a newer producer of its transactional id took over (another relay of this table, or kafka.transactional_id shared by two tables); it publishes nothing more until it holds the leadership lock again");
            } else {
                warn!(?code, %reason, "Kafka producer hit a fatal error; creating a new one");
            }
            self.renew(current);
        }
    }

    /// Puts a fresh producer in place of `stale`, unless that happened already.
    fn renew(&self, stale: &Arc<Current>) {
        if !Arc::ptr_eq(&self.producer(), stale) {
            return;
        }
        match Producer::new(
            &self.settings.producer_config(),
            QuietLog::redacting(self.settings.redactor()),
        ) {
            Ok(fresh) => {
                let mut slot = self.producer.write().expect("producer lock");
                if Arc::ptr_eq(&slot, stale) {
                    *slot = Arc::new(Current::new(fresh));
                }
            }
            Err(err) => {
                let reason = self.settings.redactor().redact(&err.to_string());
                warn!(%reason, "could not create a new Kafka producer");
            }
        }
    }

    /// Opens the batch's transaction, initializing the producer's transactions first if
    /// it has not yet.
    async fn begin_transaction(&self, current: &Arc<Current>) -> Result<(), DeliveryError> {
        if !current.initialized.load(Ordering::Acquire) {
            let timeout = self.settings.message_timeout;
            let initialized = run_blocking(current, move |producer| {
                producer.base().init_transactions(timeout)
            })
            .await;
            if let Err(err) = initialized {
                self.renew_producer_if_fatal(current);
                return Err(self.transaction_error("cannot initialize Kafka transactions", &err));
            }
            current.initialized.store(true, Ordering::Release);
            info!(transactional_id = ?self.settings.transactional_id, "Kafka transactions initialized; any earlier producer of this transactional id is fenced");
        }
        current.producer.base().begin_transaction().map_err(|err| {
            self.renew_producer_if_fatal(current);
            self.transaction_error("cannot begin a Kafka transaction", &err)
        })
    }

    /// Commits the batch's transaction if `commit`, aborts it otherwise. An abort that
    /// does not complete leaves the transaction to the next producer (whose
    /// initialization aborts it) or to the broker's `transaction.timeout.ms`.
    async fn end_transaction(
        &self,
        current: &Arc<Current>,
        commit: bool,
    ) -> Result<(), DeliveryError> {
        let timeout = self.settings.message_timeout;
        if commit {
            let mut tries = 0;
            let committed = loop {
                tries += 1;
                match run_blocking(current, move |producer| {
                    producer.commit_transaction(timeout)
                })
                .await
                {
                    Err(err) if err.retriable && tries < 3 => continue,
                    other => break other,
                }
            };
            let err = match committed {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            let error = self.transaction_failure(
                "the Kafka transaction did not commit",
                Some(err.code),
                &err.to_string(),
            );
            self.abort_transaction(current).await;
            return Err(error);
        }
        self.abort_transaction(current).await;
        Ok(())
    }

    async fn abort_transaction(&self, current: &Arc<Current>) {
        let timeout = self.settings.message_timeout;
        if let Err(err) = run_blocking(current, move |producer| {
            producer.base().abort_transaction(timeout)
        })
        .await
        {
            if current.producer.base().client().fatal_error().is_some() {
                self.renew_producer_if_fatal(current);
            } else {
                let reason = self.settings.redactor().redact(&err.to_string());
                warn!(%reason, "could not abort the Kafka transaction; replacing the producer (the next one aborts it)");
                self.renew(current);
            }
        }
    }

    /// A transaction that failed leaves the batch to be sent again; it says nothing about
    /// the messages, so it uses up no attempt.
    fn transaction_error(&self, context: &str, err: &KafkaError) -> DeliveryError {
        self.transaction_failure(context, err.rdkafka_error_code(), &err.to_string())
    }

    fn transaction_failure(
        &self,
        context: &str,
        code: Option<RDKafkaErrorCode>,
        reason: &str,
    ) -> DeliveryError {
        let reason = self.settings.redactor().redact(reason);
        let hint = match code {
            Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed) => {
                "; grant the relay's principal Write and Describe on its transactional id (README, \"Least privilege\"), or set kafka.transactions = false"
            }
            Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::Fenced) => {
                "; another producer of this transactional id took over"
            }
            _ => "",
        };
        DeliveryError::unavailable(format!("{context}: {reason}{hint}"))
    }

    /// With `topics.create = false`: which of `topics` do not exist. Their messages are
    /// not sent (librdkafka would hold them until the message timeout, and then only
    /// say "unknown topic"): they wait, in order and using up no attempt, with a reason
    /// that names the topic and the fix, until someone creates it.
    async fn check_topics_exist(&self, topics: &[&str]) -> HashMap<String, DeliveryError> {
        let mut failed = HashMap::new();
        for topic in topics {
            let timeout = self.settings.message_timeout.min(Duration::from_secs(10));
            let metadata = self.metadata(topic, timeout).await;
            let error = match metadata {
                Ok(metadata) => {
                    let exists = metadata.topics().iter().any(|t| {
                        t.name() == *topic && t.error().is_none() && !t.partitions().is_empty()
                    });
                    if exists {
                        self.known_topics
                            .lock()
                            .expect("topics lock")
                            .insert(topic.to_string());
                        continue;
                    }
                    DeliveryError::unavailable(format!(
                        "topic {topic:?} does not exist and topics.create = false: create it (for example `kafka-topics.sh --create --topic {topic}`) or set topics.create = true; its events wait, in order, until it exists"
                    ))
                }
                Err(err) => delivery_error(&err),
            };
            failed.insert(topic.to_string(), error);
        }
        failed
    }

    /// Makes sure each topic exists. Returns the topics that cannot be used, with the
    /// error to report for their messages.
    async fn ensure_topics(&self, topics: &[&str]) -> HashMap<String, DeliveryError> {
        let missing: Vec<&str> = {
            let known = self.known_topics.lock().expect("topics lock");
            topics
                .iter()
                .copied()
                .filter(|t| !known.contains(*t))
                .collect()
        };
        let mut failed = HashMap::new();
        if missing.is_empty() {
            return failed;
        }
        if !self.settings.topics.create {
            return self.check_topics_exist(&missing).await;
        }
        let new_topics: Vec<NewTopic> = missing
            .iter()
            .map(|topic| {
                NewTopic::new(
                    topic,
                    self.settings.topics.partitions,
                    TopicReplication::Fixed(self.settings.topics.replication_factor),
                )
            })
            .collect();
        // Bounded like a send: an unreachable broker answers after the message timeout,
        // not after librdkafka's 60 s socket timeout.
        let options = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(self.settings.message_timeout));
        let admin = match self.admin() {
            Ok(admin) => admin,
            Err(reason) => {
                for topic in missing {
                    failed.insert(
                        topic.to_string(),
                        DeliveryError::unavailable(format!(
                            "cannot create topic {topic:?}: {reason}"
                        )),
                    );
                }
                return failed;
            }
        };
        let created = admin.create_topics(&new_topics, &options).await;
        // Dropping an admin client joins its polling thread (up to 100 ms): not here.
        tokio::task::spawn_blocking(move || drop(admin));
        match created {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(topic) => {
                            info!(%topic, partitions = self.settings.topics.partitions, "created topic");
                            self.known_topics.lock().expect("topics lock").insert(topic);
                        }
                        Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                            self.known_topics.lock().expect("topics lock").insert(topic);
                        }
                        Err((topic, code)) => {
                            let err = KafkaError::AdminOp(code);
                            let mut error = delivery_error(&err);
                            error.reason =
                                format!("cannot create topic {topic:?}: {}", error.reason);
                            warn!(%topic, reason = %error.reason, "topic creation failed");
                            failed.insert(topic, error);
                        }
                    }
                }
            }
            Err(err) => {
                // Classified like a delivery error: a timeout or an unreachable broker is
                // an outage (no attempt used up), not a refusal of the events.
                let error = delivery_error(&err);
                for topic in missing {
                    failed.insert(
                        topic.to_string(),
                        DeliveryError {
                            kind: error.kind,
                            reason: format!("cannot create topic {topic:?}: {}", error.reason),
                        },
                    );
                }
            }
        }
        failed
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn publish(&self, messages: Vec<Message>) -> BoxFuture<'_, Vec<DeliveryOutcome>> {
        Box::pin(self.publish_batch(messages))
    }

    /// One metadata request on the producer's open connections (the relay's health
    /// probe asks every few seconds); only when it fails does a fresh client find out
    /// why (refused TLS or SASL, an unreachable host) with [`KafkaSink::check_connection`].
    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<(), CheckError>> {
        Box::pin(async move {
            // One topic, not the whole cluster's metadata; whether it exists does not
            // matter (the producer never creates topics by asking).
            let answered = self.metadata(HEALTH_TOPIC, timeout.min(CHECK_STEP)).await;
            if answered.is_ok() {
                return Ok(());
            }
            Ok(self.check_connection(timeout).await?)
        })
    }

    /// A newer producer of the transactional id fenced this sink since the last
    /// [`Sink::lead`].
    fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// This relay holds the leadership lock: a sink fenced before may initialize its
    /// transactions again, fencing in turn every older producer of the id.
    fn lead(&self) {
        self.fenced.store(false, Ordering::Release);
    }
}

impl KafkaSink {
    async fn publish_batch(&self, messages: Vec<Message>) -> Vec<DeliveryOutcome> {
        let mut topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        let failed_topics = self.ensure_topics(&topics).await;

        let current = self.producer();
        let transactional = self.settings.transactional_id.is_some();
        if transactional && self.is_fenced() {
            let error = DeliveryError::unavailable(
                "this relay was fenced by a newer relay of its table (same kafka.transactional_id); it publishes again only once it holds the leadership lock",
            );
            return vec![DeliveryOutcome::Failed(error); messages.len()];
        }
        if transactional {
            if let Err(error) = self.begin_transaction(&current).await {
                return vec![DeliveryOutcome::Failed(error); messages.len()];
            }
        }
        let producer = &current.producer;
        let deadline = tokio::time::Instant::now() + self.settings.message_timeout;
        let mut outcomes: Vec<Option<DeliveryOutcome>> = vec![None; messages.len()];
        let mut pending = Vec::with_capacity(messages.len());
        // Which messages the producer took (and so the transaction holds).
        let mut entered = vec![false; messages.len()];
        // Keys whose earlier message could not be enqueued: their later messages must
        // not overtake it, nor pass it when it is a dead letter that parks its aggregate
        // (the Sink contract), so they are not sent in this batch.
        let mut held: HashSet<(&str, &[u8])> = HashSet::new();
        for (index, message) in messages.iter().enumerate() {
            if let Some(error) = failed_topics.get(&message.topic) {
                outcomes[index] = Some(DeliveryOutcome::Failed(error.clone()));
                continue;
            }
            let key = (message.topic.as_str(), message.key.as_slice());
            if held.contains(&key) {
                outcomes[index] = Some(DeliveryOutcome::Failed(DeliveryError::retriable(
                    "held back behind an earlier event of the same aggregate that failed",
                )));
                continue;
            }
            let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
            for (name, value) in &message.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
            let (record, delivery) = Producer::record(&message.topic);
            let mut record = record.key(message.key.as_slice()).headers(headers);
            if let Some(value) = &message.value {
                record = record.payload(value.as_slice());
            }
            loop {
                match producer.base().send(record) {
                    Ok(()) => {
                        entered[index] = true;
                        pending.push((index, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        if tokio::time::Instant::now() >= deadline {
                            // The broker takes nothing: this and every later message of
                            // the key wait for the relay's retry.
                            held.insert(key);
                            outcomes[index] = Some(DeliveryOutcome::Failed(
                                DeliveryError::unavailable(format!(
                                    "the producer queue stayed full for kafka.message_timeout ({:?}); the broker is not taking messages",
                                    self.settings.message_timeout
                                )),
                            ));
                            break;
                        }
                        // The local queue is full: let deliveries drain, then try again.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((err, _)) => {
                        self.forget_topic_if_missing(&err, &message.topic);
                        let error = delivery_error(&err);
                        held.insert(key);
                        outcomes[index] = Some(DeliveryOutcome::Failed(error));
                        break;
                    }
                }
            }
        }

        if !pending.is_empty() && self.settings.linger.is_zero() {
            send_now(&current, self.settings.message_timeout);
        }
        let mut deliveries: FuturesUnordered<_> = pending
            .into_iter()
            .map(|(index, delivery)| async move { (index, delivery.await) })
            .collect();
        let mut record = |index: usize, result: Result<Result<(), KafkaError>, Canceled>| {
            outcomes[index] = Some(match result {
                Ok(Ok(())) => DeliveryOutcome::Delivered,
                Ok(Err(err)) => {
                    self.forget_topic_if_missing(&err, &messages[index].topic);
                    DeliveryOutcome::Failed(delivery_error(&err))
                }
                Err(_canceled) => DeliveryOutcome::Failed(DeliveryError::unavailable(
                    "the producer was dropped before the broker answered",
                )),
            });
        };
        let mut withdrawn = false;
        let mut gave_up = false;
        loop {
            tokio::select! {
                next = deliveries.next() => match next {
                    Some((index, result)) => record(index, result),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline), if !withdrawn => {
                    // Withdraw what is still queued: those messages fail at once, and
                    // since a partition's queue is sent in order, what was delivered stays
                    // a prefix of each key's messages (no gap for a retry to fill later).
                    producer.base().purge(PurgeConfig::default().queue());
                    withdrawn = true;
                }
                _ = tokio::time::sleep_until(deadline + PURGE_GRACE), if withdrawn => {
                    gave_up = true;
                    break;
                }
            }
        }
        // Reports that arrived together with the deadline: take them all, so that an
        // earlier message of a partition is never left unanswered behind a later one.
        while let Some(Some((index, result))) = deliveries.next().now_or_never() {
            record(index, result);
        }
        drop(deliveries);
        if gave_up {
            warn!(
                timeout = ?self.settings.message_timeout,
                "no acknowledgement from Kafka within kafka.message_timeout; the unacknowledged messages are retried (they may arrive twice)"
            );
        }
        let mut outcomes: Vec<DeliveryOutcome> = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    // In flight when the grace ended: it may still arrive, so it is
                    // retried (a duplicate at worst), behind nothing of its key.
                    DeliveryOutcome::Failed(DeliveryError::unavailable(format!(
                        "no acknowledgement within kafka.message_timeout ({:?})",
                        self.settings.message_timeout
                    )))
                })
            })
            .collect();
        if transactional {
            // All or nothing: commit only when every message the producer took was
            // acknowledged. Otherwise none of them becomes visible, and all are retried.
            let first_failure = outcomes
                .iter()
                .zip(&entered)
                .find_map(|(o, entered)| match o {
                    DeliveryOutcome::Failed(err) if *entered => Some(err.reason.clone()),
                    _ => None,
                });
            let ended = self
                .end_transaction(&current, first_failure.is_none())
                .await;
            let rolled_back = match (ended, first_failure) {
                (Ok(()), None) => None,
                (Err(error), _) => Some(error.reason),
                (Ok(()), Some(reason)) => Some(format!(
                    "rolled back with its batch's Kafka transaction, in which another message failed: {reason}"
                )),
            };
            if let Some(reason) = rolled_back {
                for outcome in &mut outcomes {
                    if *outcome == DeliveryOutcome::Delivered {
                        *outcome =
                            DeliveryOutcome::Failed(DeliveryError::unavailable(reason.clone()));
                    }
                }
            }
            if withdrawn && !outcomes.contains(&DeliveryOutcome::Delivered) {
                // A whole batch without one acknowledgement: start the next with a fresh
                // client, whose view of the cluster is new (after a paused broker,
                // librdkafka could keep a leaderless partition for minutes). Safe only
                // with transactions: the new producer's initialization aborts whatever
                // the old one still had in flight.
                warn!("no acknowledgement for a whole batch; replacing the Kafka producer");
                self.renew(&current);
            }
        }
        self.renew_producer_if_fatal(&current);
        check_key_order(&messages, &outcomes);
        outcomes
    }
}

impl KafkaSink {
    /// The metadata of `topic`, asked on the producer's connections.
    async fn metadata(&self, topic: &str, timeout: Duration) -> KafkaResult<Metadata> {
        let current = self.producer();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            current
                .producer
                .base()
                .client()
                .fetch_metadata(Some(&topic), timeout)
        })
        .await
        .expect("the metadata request does not panic")
    }

    /// An admin client for one topic creation: it does not contact the brokers until
    /// asked.
    fn admin(&self) -> Result<AdminClient<QuietLog>, String> {
        let redactor = self.settings.redactor();
        let mut config = self.settings.client_config();
        config.set("allow.auto.create.topics", "false");
        config
            .create_with_context(QuietLog::redacting(redactor.clone()))
            .map_err(|err| redactor.redact(&err.to_string()))
    }

    /// A topic deleted behind our back (or a broker replaced by an empty one): ask the
    /// admin API to create it again before the next send.
    fn forget_topic_if_missing(&self, err: &KafkaError, topic: &str) {
        if matches!(
            err.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::UnknownPartition
            )
        ) {
            self.known_topics.lock().expect("topics lock").remove(topic);
        }
    }
}

/// The producer in use.
struct Current {
    producer: Producer,
    /// With a transactional id: whether `init_transactions` succeeded for this producer.
    initialized: AtomicBool,
}

impl Current {
    fn new(producer: Producer) -> Self {
        Current {
            producer,
            initialized: AtomicBool::new(false),
        }
    }
}

/// Sends what the producer holds now, without waiting out `linger.ms` (with
/// `kafka.linger` zero, the default): the relay waits for every acknowledgement of a
/// batch before it goes on, so a wait to fill the batch could only add latency (the
/// whole batch is already queued). librdkafka treats
/// `linger.ms` as elapsed while a flush call runs; the call runs on a blocking thread,
/// detached, and returns once the producer holds nothing more (or after `timeout`).
/// rust-rdkafka's `flush` cannot be used: it calls `rd_kafka_flush` with no wait in a
/// loop, between which the broker threads see no flush and linger after all.
fn send_now(current: &Arc<Current>, timeout: Duration) {
    let current = current.clone();
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    tokio::task::spawn_blocking(move || {
        // SAFETY: the pointer is the live handle of the producer that `current` keeps
        // alive for the duration of the call; rd_kafka_flush is thread-safe and only
        // serves delivery reports, as the producer's own polling thread does.
        unsafe {
            rdkafka::bindings::rd_kafka_flush(
                current.producer.base().client().native_ptr(),
                timeout_ms,
            )
        };
    });
}

/// Runs one of librdkafka's blocking transaction calls off the async threads.
async fn run_blocking<T: Send + 'static>(
    current: &Arc<Current>,
    call: impl FnOnce(&Producer) -> T + Send + 'static,
) -> T {
    let current = current.clone();
    tokio::task::spawn_blocking(move || call(&current.producer))
        .await
        .expect("a transaction call does not panic")
}

/// The Sink contract: per topic and key, the delivered messages come before every
/// failed (non-permanent) one. Anything else is a reorder that a retry would make
/// visible; it cannot be undone here, so it is reported loudly.
fn check_key_order(messages: &[Message], outcomes: &[DeliveryOutcome]) {
    let mut failed: HashSet<(&str, &[u8])> = HashSet::new();
    for (message, outcome) in messages.iter().zip(outcomes) {
        let key = (message.topic.as_str(), message.key.as_slice());
        match outcome {
            DeliveryOutcome::Failed(err) if err.kind != outbox_core::ErrorKind::Permanent => {
                failed.insert(key);
            }
            DeliveryOutcome::Delivered if failed.contains(&key) => {
                tracing::error!(topic = %message.topic, "a message was acknowledged after an earlier one of its key failed; its retry will arrive out of order");
            }
            _ => {}
        }
    }
}
