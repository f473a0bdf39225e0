//! The dead-letter topic: what could not be delivered, with the reason, kept until an operator
//! lists and replays it.
//!
//! Two kinds of dead letters, told apart by the `hookline-dlq-kind` header:
//! - `record`: a record that could not be processed at all (undecodable, its build gone, an
//!   unreadable retry record). The value and key are the original bytes; headers say why
//!   (`hookline-dlq-reason`, `hookline-dlq-detail`) and where it came from. A replay writes it
//!   back to its source topic.
//! - `delivery`: one (event, hook) delivery that failed for good or ran out of retries. The value
//!   is the exact body; the task headers name the hook, event, build and attempts. A replay hands
//!   it to the retry topic as a fresh task (attempt 1, same body, same `Idempotency-Key`).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::ConsumerError;
use crate::attempt::{Abandoned, Pipeline};
use crate::config::ConsumerConfig;
use crate::consume::{client_config, producer_config};
use crate::task::{DeliveryTask, header, headers};

pub const H_KIND: &str = "hookline-dlq-kind";
pub const H_REASON: &str = "hookline-dlq-reason";
pub const H_DETAIL: &str = "hookline-dlq-detail";
pub const H_SOURCE_TOPIC: &str = "hookline-source-topic";
pub const H_SOURCE_PARTITION: &str = "hookline-source-partition";
pub const H_SOURCE_OFFSET: &str = "hookline-source-offset";
pub const H_DEAD_AT: &str = "hookline-dead-lettered-at";

/// Dead-letters a record that could not be processed, keeping its original bytes.
pub(crate) async fn record(
    p: &Pipeline,
    msg: &OwnedMessage,
    reason: &str,
    detail: &str,
    abandon: &CancellationToken,
) -> Result<(), Abandoned> {
    let pairs = vec![
        (H_KIND, "record".to_owned()),
        (H_REASON, reason.to_owned()),
        (H_DETAIL, detail.to_owned()),
        (H_SOURCE_TOPIC, msg.topic().to_owned()),
        (H_SOURCE_PARTITION, msg.partition().to_string()),
        (H_SOURCE_OFFSET, msg.offset().to_string()),
        (H_DEAD_AT, Utc::now().to_rfc3339()),
    ];
    p.produce_acked(
        &p.config.dlq_topic,
        msg.key().unwrap_or_default(),
        msg.payload().unwrap_or_default(),
        headers(pairs),
        abandon,
    )
    .await?;
    p.metrics.dead_letter(reason);
    Ok(())
}

/// Dead-letters one delivery, keeping its body and task.
pub(crate) async fn delivery(
    p: &Pipeline,
    task: &DeliveryTask,
    reason: &str,
    detail: &str,
    abandon: &CancellationToken,
) -> Result<(), Abandoned> {
    let mut pairs = task.header_pairs();
    pairs.extend([
        (H_KIND, "delivery".to_owned()),
        (H_REASON, reason.to_owned()),
        (H_DETAIL, detail.to_owned()),
        (H_DEAD_AT, Utc::now().to_rfc3339()),
    ]);
    let key = task.build_id.to_string();
    p.produce_acked(
        &p.config.dlq_topic,
        key.as_bytes(),
        &task.body,
        headers(pairs),
        abandon,
    )
    .await?;
    p.metrics.dead_letter(reason);
    Ok(())
}

/// What a dead letter holds.
#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetterKind {
    /// A record that could not be processed; replayed to `source_topic`.
    Record { source_topic: String },
    /// One delivery; replayed to the retry topic.
    Delivery(DeliveryTask),
}

/// One record of the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    /// When it was dead-lettered (the record's timestamp).
    pub timestamp: Option<DateTime<Utc>>,
    pub reason: String,
    pub detail: String,
    pub kind: DeadLetterKind,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
}

impl DeadLetter {
    fn from_message(msg: &OwnedMessage, default_source: &str) -> DeadLetter {
        let h = msg.headers();
        let value = msg.payload().unwrap_or_default().to_vec();
        let kind = match header(h, H_KIND).as_deref() {
            Some("delivery") => match DeliveryTask::from_headers(h, &value) {
                Ok(task) => DeadLetterKind::Delivery(task),
                Err(_) => DeadLetterKind::Record {
                    source_topic: default_source.to_owned(),
                },
            },
            _ => DeadLetterKind::Record {
                source_topic: header(h, H_SOURCE_TOPIC)
                    .unwrap_or_else(|| default_source.to_owned()),
            },
        };
        DeadLetter {
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp: msg
                .timestamp()
                .to_millis()
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
            reason: header(h, H_REASON).unwrap_or_else(|| "unknown".into()),
            detail: header(h, H_DETAIL).unwrap_or_default(),
            kind,
            key: msg.key().map(<[u8]>::to_vec),
            value,
        }
    }

    pub fn hook_id(&self) -> Option<i64> {
        match &self.kind {
            DeadLetterKind::Delivery(task) => Some(task.hook_id),
            DeadLetterKind::Record { .. } => None,
        }
    }
}

/// Every dead letter now on the topic, oldest first per partition.
pub async fn list(config: &ConsumerConfig) -> Result<Vec<DeadLetter>, ConsumerError> {
    // A throwaway group that never commits: listing must not move anyone's offsets.
    let group = format!(
        "{}.dlq-list.{}",
        config.group_id,
        uuid::Uuid::new_v4().simple()
    );
    let consumer: StreamConsumer = client_config(config, &group)
        .set("enable.auto.commit", "false")
        .create()?;
    let topic = config.dlq_topic.clone();
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Vec::new());
    };
    if meta.error().is_some() {
        // The topic does not exist yet: nothing was ever dead-lettered.
        return Ok(Vec::new());
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for partition in meta.partitions() {
        let (low, high) = consumer.fetch_watermarks(&topic, partition.id(), timeout)?;
        if high > low {
            tpl.add_partition_offset(&topic, partition.id(), Offset::Offset(low))?;
            ends.insert(partition.id(), high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    while !ends.is_empty() {
        let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .map_err(|_| ConsumerError::Config(format!("reading {topic} timed out")))??;
        let msg = msg.detach();
        if let Some(end) = ends.get(&msg.partition())
            && msg.offset() + 1 >= *end
        {
            ends.remove(&msg.partition());
        }
        out.push(DeadLetter::from_message(&msg, &config.topic));
    }
    Ok(out)
}

/// Which dead letters to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Only those dead-lettered at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only deliveries to this hook (records, which have no hook, are skipped).
    pub hook_id: Option<i64>,
}

impl ReplayFilter {
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let recent = match (self.since, letter.timestamp) {
            (Some(since), Some(at)) => at >= since,
            (Some(_), None) => false,
            (None, _) => true,
        };
        let hook = self.hook_id.is_none_or(|id| letter.hook_id() == Some(id));
        recent && hook
    }
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Deliveries handed to the retry topic.
    pub deliveries: usize,
    /// Records written back to their source topic.
    pub records: usize,
    /// Dead letters the filter left out.
    pub skipped: usize,
}

/// Re-drives the dead letters `filter` picks: deliveries go to the retry topic due now as a
/// fresh task, records back to their source topic. The dead letters stay where they are (the
/// topic is a log); replaying twice delivers twice, with the same `Idempotency-Key`.
pub async fn replay(
    config: &ConsumerConfig,
    filter: &ReplayFilter,
) -> Result<ReplaySummary, ConsumerError> {
    let letters = list(config).await?;
    let producer: FutureProducer = producer_config(config).create()?;
    let mut summary = ReplaySummary::default();
    for letter in letters {
        if !filter.matches(&letter) {
            summary.skipped += 1;
            continue;
        }
        let (topic, key, value, h) = match &letter.kind {
            DeadLetterKind::Delivery(task) => {
                let fresh = DeliveryTask {
                    attempts: 0,
                    last_error: None,
                    ..task.clone()
                };
                let mut pairs = fresh.header_pairs();
                pairs.push((
                    crate::task::H_DUE_AT,
                    Utc::now().timestamp_millis().to_string(),
                ));
                summary.deliveries += 1;
                (
                    config.retry_topic.clone(),
                    task.build_id.to_string().into_bytes(),
                    fresh.body.to_vec(),
                    headers(pairs),
                )
            }
            DeadLetterKind::Record { source_topic } => {
                summary.records += 1;
                (
                    source_topic.clone(),
                    letter.key.clone().unwrap_or_default(),
                    letter.value.clone(),
                    rdkafka::message::OwnedHeaders::new(),
                )
            }
        };
        let record = FutureRecord::to(&topic)
            .key(&key)
            .payload(&value)
            .headers(h);
        producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(e, _)| ConsumerError::Kafka(e))?;
    }
    Ok(summary)
}
