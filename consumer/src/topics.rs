//! The retry and dead-letter topics, made sure of at start.
//!
//! Relying on the broker's auto-create would create them on the first failure, with the broker's
//! default partition count, while that first hand-off holds its partition's offset; and a cluster
//! that does not auto-create would refuse it. So the consumer creates what is missing before it
//! subscribes: as many partitions as the main topic (retries spread over the group like the
//! events they come from) or `retry_partitions`, and the broker's default replication. With
//! `create_topics` off (a service account that may not create topics), it checks that they exist
//! and refuses to start if not, naming them.

use std::time::Duration;

use hookline_shell::kafka_log::KafkaLogContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use tracing::{info, warn};

use crate::ConsumerError;
use crate::config::ConsumerConfig;

const TIMEOUT: Duration = Duration::from_secs(15);

/// The partition count of each of `topics` (`None` when the topic does not exist).
fn partitions(
    config: &ConsumerConfig,
    topics: &[&str],
) -> Result<Vec<Option<usize>>, ConsumerError> {
    let client: BaseConsumer<KafkaLogContext> = crate::kafka::base_config(config)
        .set("allow.auto.create.topics", "false")
        .create_with_context(KafkaLogContext::default())?;
    topics
        .iter()
        .map(|topic| {
            let metadata = client.fetch_metadata(Some(topic), TIMEOUT)?;
            Ok(metadata
                .topics()
                .iter()
                .find(|t| t.name() == *topic && t.error().is_none() && !t.partitions().is_empty())
                .map(|t| t.partitions().len()))
        })
        .collect()
}

/// Why the topics could not be made sure of.
#[derive(Debug)]
pub enum EnsureError {
    /// Kafka did not answer (unreachable, timed out): try again.
    Unavailable(ConsumerError),
    /// Missing with creation off, or creation refused: the consumer cannot run.
    Fatal(ConsumerError),
}

impl std::fmt::Display for EnsureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnsureError::Unavailable(e) | EnsureError::Fatal(e) => e.fmt(f),
        }
    }
}

/// Creates the retry and dead-letter topics if they are missing (or, with creation off, checks
/// that they exist).
pub async fn ensure(config: &ConsumerConfig) -> Result<(), EnsureError> {
    let fatal = EnsureError::Fatal;
    let config_for_lookup = config.clone();
    let names = [
        config.topic.clone(),
        config.retry_topic.clone(),
        config.dlq_topic.clone(),
    ];
    let found = tokio::task::spawn_blocking(move || {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        partitions(&config_for_lookup, &names)
    })
    .await
    .map_err(|e| fatal(ConsumerError::Config(format!("topic lookup panicked: {e}"))))?
    .map_err(EnsureError::Unavailable)?;
    let missing: Vec<&str> = [&config.retry_topic, &config.dlq_topic]
        .into_iter()
        .zip(&found[1..])
        .filter(|(_, n)| n.is_none())
        .map(|(t, _)| t.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !config.create_topics {
        return Err(fatal(ConsumerError::Config(format!(
            "topics {} do not exist: create them, or let the consumer create them (drop --no-create-topics)",
            missing.join(", ")
        ))));
    }
    let partitions = match (config.retry_partitions, found[0]) {
        (Some(n), _) => n,
        (None, Some(n)) => i32::try_from(n).unwrap_or(i32::MAX),
        (None, None) => {
            warn!(topic = %config.topic, "the main topic does not exist yet; creating the retry and dead-letter topics with 1 partition (set --retry-partitions to choose)");
            1
        }
    };
    let admin: AdminClient<KafkaLogContext> = crate::kafka::base_config(config)
        .create_with_context(KafkaLogContext::default())
        .map_err(|e| fatal(e.into()))?;
    // -1: the broker's default replication factor.
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    let results = tokio::time::timeout(TIMEOUT + TIMEOUT, admin.create_topics(&new, &options))
        .await
        .map_err(|_| {
            EnsureError::Unavailable(ConsumerError::Config(format!(
                "creating {} timed out",
                missing.join(", ")
            )))
        })?
        .map_err(|e| EnsureError::Unavailable(e.into()))?;
    for result in results {
        match result {
            Ok(name) => info!(topic = %name, partitions, "topic created"),
            // Another instance created it meanwhile.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(fatal(ConsumerError::Config(format!(
                    "cannot create topic {name}: {code} (create it yourself and start with --no-create-topics)"
                ))));
            }
        }
    }
    Ok(())
}
