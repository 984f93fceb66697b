//! The harness's topics are deleted once measured: a full run writes tens of GiB to
//! them (a 2 GiB backlog per system and round), enough to fill the disk if kept.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

/// The systems whose topics the harness names `bench-<system>-<12 hex digits>.…`.
const OWNERS: &[&str] = &[
    "polling",
    "cdc",
    "debezium",
    "debezium-tuned",
    "kafka-alone",
];

pub struct Topics {
    admin: AdminClient<DefaultClientContext>,
}

impl Topics {
    pub fn connect(brokers: &str, properties: &BTreeMap<String, String>) -> Result<Topics> {
        let mut config = ClientConfig::new();
        for (name, value) in properties {
            config.set(name, value);
        }
        let admin = config
            .set("bootstrap.servers", brokers)
            .create()
            .context("creating the Kafka admin client that deletes the bench's topics")?;
        Ok(Topics { admin })
    }

    /// Deletes `names`; a topic that does not exist (never created) is no error.
    pub async fn delete(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = self
            .admin
            .delete_topics(&names, &options)
            .await
            .context("deleting the bench's topics")?;
        for result in results {
            match result {
                Ok(_) => {}
                Err((_, rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => {
                    anyhow::bail!("deleting the bench topic {topic}: {code}")
                }
            }
        }
        Ok(())
    }

    /// Deletes what an interrupted run left: every topic named as the harness names
    /// its own, and no other.
    pub async fn delete_leftovers(&self) -> Result<usize> {
        let leftovers = self.topics_where(is_bench_topic)?;
        self.delete(&leftovers).await?;
        Ok(leftovers.len())
    }

    /// The topics of one session: its own topic, and for Debezium whatever else it
    /// created under the session's prefix.
    pub async fn delete_with_prefix(&self, prefix: &str) -> Result<()> {
        let names = self.topics_where(|name| {
            name == prefix
                || name
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
        })?;
        self.delete(&names).await
    }

    /// The broker's topics whose names `keep` accepts.
    fn topics_where(&self, keep: impl Fn(&str) -> bool) -> Result<Vec<String>> {
        let metadata = self
            .admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .context("listing the broker's topics")?;
        Ok(metadata
            .topics()
            .iter()
            .map(|topic| topic.name())
            .filter(|name| keep(name))
            .map(str::to_string)
            .collect())
    }
}

/// `bench-<owner>-<12 hex digits>`, alone or followed by `.<rest>`, as `BenchDb::create`
/// and the Kafka-alone limit name their topics.
fn is_bench_topic(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("bench-") else {
        return false;
    };
    OWNERS.iter().any(|owner| {
        rest.strip_prefix(owner)
            .and_then(|rest| rest.strip_prefix('-'))
            .map(|rest| rest.split_once('.').map_or(rest, |(unique, _)| unique))
            .is_some_and(|unique| {
                unique.len() == 12 && unique.bytes().all(|b| b.is_ascii_hexdigit())
            })
    })
}

#[cfg(test)]
mod tests {
    use super::is_bench_topic;

    #[test]
    fn only_the_harness_own_topic_names_are_deleted() {
        assert!(is_bench_topic("bench-polling-01a240e81456.order"));
        assert!(is_bench_topic(
            "bench-debezium-tuned-01a240f5ee6a.outbox.event.order"
        ));
        assert!(is_bench_topic("bench-kafka-alone-01a240e393eb.order"));
        assert!(is_bench_topic("bench-debezium-01a240f3c632"));
        assert!(!is_bench_topic("bench-polling.order"));
        assert!(!is_bench_topic("bench-polling-01a240e8145.order"));
        assert!(!is_bench_topic("bench-orders-01a240e81456.order"));
        assert!(!is_bench_topic("shop.event.order"));
        assert!(!is_bench_topic("bench-cdc-01a240e8145z.order"));
    }
}
