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
use rdkafka::producer::{BaseProducer, BaseRecord};
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
}

impl Drop for Producer {
    fn drop(&mut self) {
        // The thread ends within a poll period; the client goes with its last reference.
        self.stop.store(true, Ordering::Release);
    }
}
