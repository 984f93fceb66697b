//! The relay's producer: librdkafka's base producer, its delivery reports served by a
//! thread of its own and awaited as futures.
//!
//! rust-rdkafka's `FutureProducer` does the same with a thread that polls every 100 ms,
//! and its poll rounds the time left down to whole milliseconds, so it spins through
//! the last millisecond of each poll: about 1% of a core on an idle relay. This thread
//! polls for [`POLL_PERIOD`], so what spinning remains is a fiftieth of that.

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::ClientConfig;

use crate::context::QuietLog;

/// How long one poll of the delivery reports waits; also how long the polling thread
/// outlives its producer at most.
const POLL_PERIOD: Duration = Duration::from_secs(5);

/// What the broker said about one message.
pub(crate) type Delivery = oneshot::Receiver<Result<(), KafkaError>>;

/// Where [`QuietLog`]'s delivery callback tells a [`Delivery`] what became of it.
pub(crate) type DeliverySender = Box<oneshot::Sender<Result<(), KafkaError>>>;

/// A message to send; it carries the sender of its [`Delivery`].
pub(crate) type Record<'a> = BaseRecord<'a, [u8], [u8], DeliverySender>;

pub(crate) struct Producer {
    base: Arc<BaseProducer<QuietLog>>,
    stop: Arc<AtomicBool>,
}

impl Producer {
    pub(crate) fn new(config: &ClientConfig, context: QuietLog) -> KafkaResult<Producer> {
        let base: Arc<BaseProducer<QuietLog>> = Arc::new(config.create_with_context(context)?);
        let stop = Arc::new(AtomicBool::new(false));
        let polled = (base.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-deliveries".into())
            .spawn(move || {
                let (base, stop) = polled;
                while !stop.load(Ordering::Acquire) {
                    base.poll(POLL_PERIOD);
                }
            })
            .map_err(|err| KafkaError::ClientCreation(err.to_string()))?;
        Ok(Producer { base, stop })
    }

    /// A record of `topic`, and the [`Delivery`] that will tell what became of it.
    pub(crate) fn record(topic: &str) -> (Record<'_>, Delivery) {
        let (sender, delivery) = oneshot::channel();
        (
            BaseRecord::with_opaque_to(topic, Box::new(sender)),
            delivery,
        )
    }

    /// The librdkafka producer: `send` a [`Record`], the transaction calls, purges.
    pub(crate) fn base(&self) -> &BaseProducer<QuietLog> {
        &self.base
    }

    /// Commits the open transaction, blocking: librdkafka's own call, which waits for
    /// the messages still outstanding while this producer's thread serves their reports.
    ///
    /// Not rust-rdkafka's `commit_transaction`: it flushes first with a loop that polls
    /// the report queue itself, for up to 100 ms at a time, whenever a message is
    /// outstanding. A message counts as outstanding until its report is released, so
    /// that happens whenever our thread has told the batch its outcome and not yet
    /// released the report; the loop's poll then waits for a report that our thread
    /// already took, and the commit waits out the 100 ms (about one transaction in a
    /// hundred, the whole p99 of the relay's latency).
    pub(crate) fn commit_transaction(&self, timeout: Duration) -> Result<(), CommitError> {
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: the handle is alive as long as `self`. The call is thread-safe; the
        // returned error, when not null, is ours to read and to destroy, once.
        unsafe {
            let error = rdkafka::bindings::rd_kafka_commit_transaction(
                self.base.client().native_ptr(),
                timeout_ms,
            );
            if error.is_null() {
                return Ok(());
            }
            let code = RDKafkaErrorCode::from(rdkafka::bindings::rd_kafka_error_code(error));
            let retriable = rdkafka::bindings::rd_kafka_error_is_retriable(error) != 0;
            let message = CStr::from_ptr(rdkafka::bindings::rd_kafka_error_string(error))
                .to_string_lossy()
                .into_owned();
            rdkafka::bindings::rd_kafka_error_destroy(error);
            Err(CommitError {
                code,
                retriable,
                message,
            })
        }
    }
}

/// Why [`Producer::commit_transaction`] failed.
#[derive(Debug, Clone)]
pub(crate) struct CommitError {
    pub(crate) code: RDKafkaErrorCode,
    /// librdkafka says the same call may succeed if made again.
    pub(crate) retriable: bool,
    pub(crate) message: String,
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // The thread ends within a poll period; the client goes with its last reference.
        self.stop.store(true, Ordering::Release);
    }
}
