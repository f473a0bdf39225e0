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
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::ConsumerError;
use crate::config::ConsumerConfig;
pub use crate::handoff::{
    H_BODY_BYTES, H_BODY_SHA256, H_DEAD_AT, H_DETAIL, H_IDEMPOTENCY_KEY, H_KIND, H_REASON,
    KIND_DELIVERY, KIND_RECORD, KIND_REFERENCE,
};
use crate::kafka::{HandoffProducer, client_config, producer_config};
use crate::task::{DeliveryTask, header, headers};
pub use crate::task::{H_ONLY_HOOK, H_SOURCE_OFFSET, H_SOURCE_PARTITION, H_SOURCE_TOPIC, Source};

/// What a dead letter holds.
#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetterKind {
    /// A record that could not be processed; replayed to `source_topic`.
    Record { source_topic: String },
    /// One delivery; replayed to the retry topic.
    Delivery(DeliveryTask),
    /// A compact dead letter: a hand-off Kafka refused for good (too large, refused). It holds
    /// no body; a replay writes the event's source record to the main topic again, for this hook
    /// only when it names one.
    Reference {
        source: Option<Source>,
        hook_id: Option<i64>,
        idempotency_key: Option<String>,
        body_bytes: Option<u64>,
        body_sha256: Option<String>,
    },
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
            Some(KIND_REFERENCE) => DeadLetterKind::Reference {
                source: Source::from_headers(h),
                hook_id: header(h, crate::task::H_HOOK_ID).and_then(|v| v.parse().ok()),
                idempotency_key: header(h, H_IDEMPOTENCY_KEY),
                body_bytes: header(h, H_BODY_BYTES).and_then(|v| v.parse().ok()),
                body_sha256: header(h, H_BODY_SHA256),
            },
            Some(KIND_DELIVERY) => match DeliveryTask::from_headers(h, &value) {
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
            DeadLetterKind::Reference { hook_id, .. } => *hook_id,
            DeadLetterKind::Record { .. } => None,
        }
    }
}

/// A consumer for reading records by hand, in a throwaway group that never commits (an
/// operator's look must not move anyone's offsets) and never creates a topic.
fn reader(config: &ConsumerConfig, purpose: &str) -> Result<StreamConsumer, ConsumerError> {
    config.check_kafka_options()?;
    let group = format!(
        "{}.{purpose}.{}",
        config.group_id,
        uuid::Uuid::new_v4().simple()
    );
    Ok(client_config(config, &group)
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .create()?)
}

/// How long listing waits for a partition of the dead-letter topic to get a leader (a topic
/// created a moment ago has none yet).
const LEADER_WAIT: Duration = Duration::from_secs(15);

/// Every dead letter now on the topic, oldest first per partition. Listing never creates the
/// topic: a topic that does not exist holds no dead letters.
pub async fn list(config: &ConsumerConfig) -> Result<Vec<DeadLetter>, ConsumerError> {
    let consumer = reader(config, "dlq-list")?;
    let topic = config.dlq_topic.clone();
    let ends = watermarks(&consumer, &topic).await?;
    let mut out = Vec::new();
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = ends
        .into_iter()
        .filter(|(_, (low, high))| high > low)
        .map(|(partition, (low, high))| {
            let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(low));
            (partition, high)
        })
        .collect();
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

/// The low and high watermark of each partition of `topic` (none if the topic does not exist),
/// waiting up to [`LEADER_WAIT`] for partitions without a leader yet.
async fn watermarks<C: rdkafka::consumer::ConsumerContext>(
    consumer: &StreamConsumer<C>,
    topic: &str,
) -> Result<Vec<(i32, (i64, i64))>, ConsumerError> {
    let timeout = Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        let attempt = (|| {
            let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
            let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Ok(Vec::new());
            };
            match meta.error() {
                None => {}
                Some(e)
                    if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition =>
                {
                    // Nothing was ever dead-lettered.
                    return Ok(Vec::new());
                }
                Some(e) => return Err(KafkaError::MetadataFetch(e.into())),
            }
            meta.partitions()
                .iter()
                .map(|p| {
                    consumer
                        .fetch_watermarks(topic, p.id(), timeout)
                        .map(|w| (p.id(), w))
                })
                .collect::<Result<Vec<_>, _>>()
        })();
        match attempt {
            Ok(found) => return Ok(found),
            Err(error) if tokio::time::Instant::now() < deadline && leaderless(&error) => {
                tracing::debug!(%error, "dead-letter topic has no leader yet; waiting");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// The record at `source`, or `None` if it is no longer on the topic.
async fn read_one(
    config: &ConsumerConfig,
    source: &Source,
) -> Result<Option<OwnedMessage>, ConsumerError> {
    let consumer = reader(config, "dlq-read")?;
    let (low, high) =
        consumer.fetch_watermarks(&source.topic, source.partition, Duration::from_secs(10))?;
    if source.offset < low || source.offset >= high {
        return Ok(None);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(
        &source.topic,
        source.partition,
        Offset::Offset(source.offset),
    )?;
    consumer.assign(&tpl)?;
    let msg = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .map_err(|_| ConsumerError::Config(format!("reading {source:?} timed out")))??;
    Ok((msg.offset() == source.offset).then(|| msg.detach()))
}

/// Errors of a partition that is still being set up (no leader elected yet).
fn leaderless(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::BrokerNotAvailable
                | RDKafkaErrorCode::OperationTimedOut
        )
    )
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
    /// Compact dead letters re-driven from their event's source record.
    pub references: usize,
    /// Compact dead letters whose source record is gone (past the topic's retention) or
    /// unnamed: they cannot be re-driven, and are left as they are.
    pub unreplayable: usize,
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
    let producer: HandoffProducer =
        producer_config(config).create_with_context(Default::default())?;
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
                    replayed: true,
                    resend: false,
                    rate_token_for: None,
                    ..task.clone()
                };
                summary.deliveries += 1;
                let (key, headers) = crate::handoff::retry_record(&fresh, Utc::now());
                (
                    config.retry_topic.clone(),
                    key,
                    fresh.body.to_vec(),
                    headers,
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
            DeadLetterKind::Reference {
                source, hook_id, ..
            } => {
                let Some(source) = source else {
                    summary.unreplayable += 1;
                    continue;
                };
                let Some(original) = read_one(config, source).await? else {
                    tracing::warn!(
                        ?source,
                        "the source record of a compact dead letter is gone; not replayed"
                    );
                    summary.unreplayable += 1;
                    continue;
                };
                summary.references += 1;
                // Through the main topic again (the body is rendered anew for a legacy event,
                // sent as embedded for an inline one), to this hook only when the letter names one.
                let pairs = hook_id.map(|id| (H_ONLY_HOOK, id.to_string()));
                (
                    source.topic.clone(),
                    original.key().map(<[u8]>::to_vec).unwrap_or_default(),
                    original.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers(pairs),
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
