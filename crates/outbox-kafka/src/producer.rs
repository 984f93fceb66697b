//! The relay's producer: librdkafka's base producer, its delivery reports served by a
//! thread of its own and awaited as futures.
//!
//! rust-rdkafka's `FutureProducer` does the same with a thread that polls every 100 ms,
//! and its poll rounds the time left down to whole milliseconds, so it spins through
//! the last millisecond of each poll: about 1% of a core on an idle relay. This thread
//! polls for [`POLL_PERIOD`], so what spinning remains is a fiftieth of that.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

use crate::context::QuietLog;

/// How long one poll of the delivery reports waits; also how long the polling thread
/// outlives its producer at most.
const POLL_PERIOD: Duration = Duration::from_secs(5);

/// What the broker said about one message.
pub(crate) type Delivery = oneshot::Receiver<Result<(), KafkaError>>;

/// A message to send; it carries the sender of its [`Delivery`].
pub(crate) type Record<'a> =
    BaseRecord<'a, [u8], [u8], Box<oneshot::Sender<Result<(), KafkaError>>>>;

/// [`QuietLog`], plus the delivery reports.
pub(crate) struct Reporting(pub(crate) QuietLog);

impl ClientContext for Reporting {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        self.0.log(level, facility, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason)
    }
}

impl ProducerContext for Reporting {
    type DeliveryOpaque = Box<oneshot::Sender<Result<(), KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, sender: Self::DeliveryOpaque) {
        // The receiver may be gone (a publish that gave up waiting): nothing to tell.
        let _ = sender.send(result.as_ref().map(|_| ()).map_err(|(err, _)| err.clone()));
    }
}

pub(crate) struct Producer {
    base: Arc<BaseProducer<Reporting>>,
    stop: Arc<AtomicBool>,
}

impl Producer {
    pub(crate) fn new(config: &ClientConfig, context: QuietLog) -> KafkaResult<Producer> {
        let base: Arc<BaseProducer<Reporting>> =
            Arc::new(config.create_with_context(Reporting(context))?);
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
    pub(crate) fn base(&self) -> &BaseProducer<Reporting> {
        &self.base
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        // The thread ends within a poll period; the client goes with its last reference.
        self.stop.store(true, Ordering::Release);
    }
}
