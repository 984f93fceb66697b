//! One consumer per session reads the system's topic from its beginning on a thread of
//! its own and records when each event id first arrived, and how many came again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use uuid::Uuid;

use crate::now_micros;

#[derive(Default)]
struct Seen {
    first_arrival: HashMap<Uuid, u64>,
    duplicates: u64,
}

pub struct Arrivals {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How a set of written events arrived.
pub struct Settled {
    pub missing: usize,
    /// How many were waited for.
    pub expected: usize,
    /// How long they were waited for at most.
    pub waited: Duration,
    /// When the last of them arrived, µs (0 when none did).
    pub last_arrival: u64,
    /// Commit → arrival, µs.
    pub latency: Histogram<u64>,
}

impl Settled {
    /// A drain's result: fails, naming `what`, unless every event arrived.
    pub fn drained(&self, what: &str) -> Result<()> {
        if self.missing > 0 {
            bail!(
                "{what}: {} of {} events never arrived within {:?}",
                self.missing,
                self.expected,
                self.waited
            );
        }
        Ok(())
    }

    /// Seconds from `since` (µs since the epoch) to the last arrival.
    pub fn seconds_since(&self, since: u64) -> f64 {
        self.last_arrival.saturating_sub(since) as f64 / 1e6
    }
}

impl Arrivals {
    /// Starts reading `topic` (which must exist) from the beginning of every partition.
    pub fn start(
        brokers: &str,
        properties: &std::collections::BTreeMap<String, String>,
        topic: &str,
    ) -> Result<Arrivals> {
        let mut config = ClientConfig::new();
        for (name, value) in properties {
            config.set(name, value);
        }
        let consumer: BaseConsumer = config
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("bench-{}", Uuid::now_v7()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if partitions == 0 {
            bail!("topic {topic} does not exist yet");
        }
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            assignment.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) else {
                        continue;
                    };
                    let arrived = now_micros();
                    if let Some(id) = message_id(&message) {
                        let mut seen = seen.lock().unwrap();
                        if seen.first_arrival.insert(id, arrived).is_some() {
                            seen.duplicates += 1;
                            // Keep the first arrival: latency is about the first copy.
                            let first = seen.first_arrival.get_mut(&id).unwrap();
                            *first = (*first).min(arrived);
                        }
                    }
                }
            })
        };
        Ok(Arrivals {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.seen.lock().unwrap().first_arrival.contains_key(id)
    }

    pub fn duplicates(&self) -> u64 {
        self.seen.lock().unwrap().duplicates
    }

    /// Waits until every event in `commits` arrived, or `timeout` passed.
    pub async fn settle(&self, commits: &[(Uuid, u64)], timeout: Duration) -> Settled {
        let deadline = Instant::now() + timeout;
        let mut waiting: Vec<Uuid> = commits.iter().map(|(id, _)| *id).collect();
        loop {
            {
                let seen = self.seen.lock().unwrap();
                waiting.retain(|id| !seen.first_arrival.contains_key(id));
            }
            if waiting.is_empty() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = self.seen.lock().unwrap();
        let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        let mut last_arrival = 0;
        for (id, committed) in commits {
            if let Some(&arrived) = seen.first_arrival.get(id) {
                last_arrival = last_arrival.max(arrived);
                // The writer stamps after COMMIT returns, so a message can arrive a few
                // µs "before" its stamp: that counts as 1 µs.
                latency.saturating_record(arrived.saturating_sub(*committed).max(1));
            }
        }
        Settled {
            missing: waiting.len(),
            expected: commits.len(),
            waited: timeout,
            last_arrival,
            latency,
        }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn message_id(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<Uuid> {
    message.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == "id")
            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<Uuid>().ok())
    })
}
