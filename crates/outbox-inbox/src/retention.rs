//! How long inbox rows must be kept: at least as long as Kafka may still deliver the
//! message again. A consumer whose offsets are reset (or a new group) replays whatever
//! the topic still holds; an id whose inbox row is already purged is applied twice.
//! Kafka deletes whole segments, so a message can outlive `retention.ms` by up to
//! `segment.ms`: rows are kept for the sum.

use std::time::Duration;

use outbox_kafka::QuietLog;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use tracing::info;

use crate::settings::{Retention, Settings};
use crate::InboxError;

/// How long the topics may keep a message: `None` when one keeps messages forever.
/// Topics that do not exist yet are left out.
async fn topic_lifetime(settings: &Settings) -> Result<Option<Duration>, InboxError> {
    let admin: AdminClient<QuietLog> = settings
        .admin_config()
        .create_with_context(QuietLog::redacting(settings.redactor()))
        .map_err(|err| settings.config_error(err))?;
    let resources: Vec<ResourceSpecifier<'_>> = settings
        .topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(t.as_str()))
        .collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .describe_configs(&resources, &options)
        .await
        .map_err(|source| InboxError::BrokersUnreachable {
            brokers: settings.brokers.clone(),
            source,
        })?;
    let mut longest = Duration::ZERO;
    for resource in results.into_iter().flatten() {
        let millis = |name: &str| -> Option<i64> {
            resource
                .get(name)
                .and_then(|entry| entry.value.as_deref())
                .and_then(|v| v.parse().ok())
        };
        let Some(retention) = millis("retention.ms") else {
            continue;
        };
        if retention < 0 {
            return Ok(None);
        }
        let segment = millis("segment.ms").unwrap_or(0).max(0);
        longest = longest.max(Duration::from_millis((retention + segment) as u64));
    }
    Ok(Some(longest))
}

/// The retention the inbox runs with: `None` keeps rows forever.
///
/// # Errors
///
/// [`InboxError::RetentionTooShort`] when a retention was set that is shorter than the
/// topics may keep a message: a replay would apply events twice.
pub(crate) async fn resolve(settings: &Settings) -> Result<Option<Duration>, InboxError> {
    match settings.retention {
        Retention::Forever => Ok(None),
        Retention::FollowTopics => {
            let lifetime = topic_lifetime(settings).await?;
            match lifetime {
                None => info!(
                    topics = ?settings.topics,
                    "a topic keeps messages forever, so inbox rows are kept forever"
                ),
                Some(lifetime) => info!(
                    topics = ?settings.topics,
                    retention = ?lifetime,
                    "inbox rows are kept as long as the topics may keep a message (retention.ms + segment.ms)"
                ),
            }
            // Topics that do not exist yet: keep everything until the next start.
            Ok(lifetime.filter(|l| !l.is_zero()))
        }
        Retention::Fixed(retention) => match topic_lifetime(settings).await? {
            Some(lifetime) if retention >= lifetime => Ok(Some(retention)),
            lifetime => Err(InboxError::RetentionTooShort {
                retention,
                topics: settings.topics.clone(),
                lifetime: lifetime
                    .map(|l| format!("{} s (retention.ms + segment.ms)", l.as_secs()))
                    .unwrap_or_else(|| "forever (retention.ms = -1)".into()),
            }),
        },
    }
}
