//! Hand-offs: a delivery task to the retry topic, a delivery or a record to the dead-letter topic,
//! each waited for until the broker acknowledges it (only then may the offset of the record that
//! carried the work be stored).
//!
//! # Errors that end the wait
//!
//! Kafka's errors fall in two kinds. Retriable ones (a broker down, a timeout, a leader change)
//! are waited out, as long as it takes, visibly (see `shutdown::wait_out`). Permanent ones (a
//! record too large, an invalid record, an authorization failure, an unknown topic) would fail
//! the same way for ever, so they are never tried again: the hand-off ends in a *compact* dead
//! letter instead, which holds no body but everything needed to do the delivery again (hook,
//! event id, `Idempotency-Key`, the event's main-topic record, body size and SHA-256). `dlq
//! replay` re-drives it from that record. If Kafka refuses even that, the loss is counted
//! (`handoffs_lost`) and logged with every identifier: the one place where a delivery can be
//! lost, and never silently.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hookline_cistate::Hook;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::kafka::HandoffProducer;
use crate::metrics::{ConsumerMetrics, Stall};
use crate::shutdown::{Abandoned, wait_out};
use crate::task::{DeliveryTask, H_DUE_AT, Source, headers};

pub const H_KIND: &str = "hookline-dlq-kind";
pub const H_REASON: &str = "hookline-dlq-reason";
pub const H_DETAIL: &str = "hookline-dlq-detail";
pub const H_DEAD_AT: &str = "hookline-dead-lettered-at";
pub const H_IDEMPOTENCY_KEY: &str = "hookline-idempotency-key";
pub const H_BODY_BYTES: &str = "hookline-body-bytes";
pub const H_BODY_SHA256: &str = "hookline-body-sha256";

/// `hookline-dlq-kind` of a record that could not be processed (original key and value kept).
pub const KIND_RECORD: &str = "record";
/// `hookline-dlq-kind` of one (event, hook) delivery (exact body kept).
pub const KIND_DELIVERY: &str = "delivery";
/// `hookline-dlq-kind` of a compact dead letter: no body, a reference to the source record.
pub const KIND_REFERENCE: &str = "reference";

/// Why something was dead-lettered: the `hookline-dlq-reason` header and the `reason` label of
/// `hookline_consumer_dead_letters_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// The record's bytes could not be decoded (the decoder's reason: `bad_magic`, ...).
    Undecodable(&'static str),
    /// The build of a legacy event is gone from the CI state store: nothing to render.
    BuildNotFound,
    /// A retry-topic record whose task headers cannot be read.
    BadRetryRecord,
    /// The hook is disabled for good (40 failures, or 410 Gone earlier).
    HookDisabled,
    /// The hook was removed before a retry.
    HookRemoved,
    /// The last scheduled retry failed too.
    RetriesExhausted,
    /// A final answer (4xx other than 408/425/429, a refused URL).
    FinalResponse,
    /// 410 Gone: the hook was disabled by it.
    Gone,
    /// Kafka refused the hand-off as too large; dead-lettered as a reference.
    HandoffTooLarge,
    /// Kafka refused the hand-off for good (invalid, unauthorized, unknown topic).
    HandoffRefused,
}

impl DeadLetterReason {
    /// Every reason but the decoder's (those are named by the decoder when they happen).
    pub const KNOWN: [DeadLetterReason; 9] = [
        DeadLetterReason::BuildNotFound,
        DeadLetterReason::BadRetryRecord,
        DeadLetterReason::HookDisabled,
        DeadLetterReason::HookRemoved,
        DeadLetterReason::RetriesExhausted,
        DeadLetterReason::FinalResponse,
        DeadLetterReason::Gone,
        DeadLetterReason::HandoffTooLarge,
        DeadLetterReason::HandoffRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Undecodable(reason) => reason,
            DeadLetterReason::BuildNotFound => "build_not_found",
            DeadLetterReason::BadRetryRecord => "bad_retry_record",
            DeadLetterReason::HookDisabled => "hook_disabled",
            DeadLetterReason::HookRemoved => "hook_removed",
            DeadLetterReason::RetriesExhausted => "retries_exhausted",
            DeadLetterReason::FinalResponse => "final_response",
            DeadLetterReason::Gone => "gone",
            DeadLetterReason::HandoffTooLarge => "handoff_too_large",
            DeadLetterReason::HandoffRefused => "handoff_refused",
        }
    }
}

/// Why Kafka will never take a record as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooLarge,
    Refused,
}

impl Refusal {
    fn reason(self) -> DeadLetterReason {
        match self {
            Refusal::TooLarge => DeadLetterReason::HandoffTooLarge,
            Refusal::Refused => DeadLetterReason::HandoffRefused,
        }
    }
}

/// Whether a produce error is permanent; `None` for errors worth waiting out.
pub fn classify(error: &KafkaError) -> Option<Refusal> {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code()? {
        C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => {
            Some(Refusal::TooLarge)
        }
        C::InvalidMessage
        | C::InvalidRecord
        | C::InvalidTopic
        | C::InvalidRequiredAcks
        | C::InvalidArgument
        | C::PolicyViolation
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        // Both services create their topics at start (or are told not to): a topic unknown at
        // produce time is missing for good, not still being created.
        | C::UnknownTopic
        | C::UnknownTopicOrPartition
        | C::UnknownPartition => Some(Refusal::Refused),
        _ => None,
    }
}

/// Where a hand-off landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landed {
    /// Written as asked, and acked.
    AsIs,
    /// Refused for good; a compact dead letter with this reason was written instead (acked).
    AsReference(DeadLetterReason),
    /// Refused for good, and so was the compact dead letter: counted and logged, not retried.
    Lost,
}

/// The writer of hand-offs: the idempotent producer and the topics it writes to.
pub struct Handoff {
    producer: HandoffProducer,
    retry_topic: String,
    dlq_topic: String,
    metrics: Arc<ConsumerMetrics>,
}

/// How long one send may wait in librdkafka's queue before it counts as a failed try.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

impl Handoff {
    pub fn new(
        producer: HandoffProducer,
        retry_topic: String,
        dlq_topic: String,
        metrics: Arc<ConsumerMetrics>,
    ) -> Self {
        Handoff {
            producer,
            retry_topic,
            dlq_topic,
            metrics,
        }
    }

    /// The producer, for readiness probes.
    pub fn producer(&self) -> &HandoffProducer {
        &self.producer
    }

    /// Writes a record and waits for the ack, waiting out retriable errors; a permanent refusal
    /// is returned, never tried again.
    async fn produce(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: OwnedHeaders,
        abandon: &CancellationToken,
    ) -> Result<Result<(), (Refusal, KafkaError)>, Abandoned> {
        let what = format!("hand-off to {topic} not acked");
        wait_out(&self.metrics, Stall::Handoff, &what, abandon, || {
            let record = FutureRecord::to(topic)
                .key(key)
                .payload(value)
                .headers(headers.clone());
            async move {
                match self
                    .producer
                    .send(record, Timeout::After(SEND_TIMEOUT))
                    .await
                {
                    Ok(_) => Ok(Ok(())),
                    Err((error, _)) => match classify(&error) {
                        Some(refusal) => Ok(Err((refusal, error))),
                        None => Err(error),
                    },
                }
            }
        })
        .await
    }

    /// Hands `task` to the retry topic, due at `due`. `hook` (when known) names the
    /// `Idempotency-Key` in the compact dead letter should Kafka refuse the record for good.
    pub(crate) async fn to_retry(
        &self,
        task: &DeliveryTask,
        hook: Option<&Hook>,
        due: DateTime<Utc>,
        abandon: &CancellationToken,
    ) -> Result<Landed, Abandoned> {
        let (key, headers) = retry_record(task, due);
        let topic = &self.retry_topic;
        match self
            .produce(topic, &key, &task.body, headers, abandon)
            .await?
        {
            Ok(()) => Ok(Landed::AsIs),
            Err((refusal, error)) => {
                let detail = format!("the retry hand-off was refused: {error}");
                self.reference(task, hook, refusal, &detail, abandon).await
            }
        }
    }

    /// Dead-letters one delivery, keeping its body and task.
    pub(crate) async fn dead_letter_delivery(
        &self,
        task: &DeliveryTask,
        hook: Option<&Hook>,
        reason: DeadLetterReason,
        detail: &str,
        abandon: &CancellationToken,
    ) -> Result<Landed, Abandoned> {
        let mut pairs = task.header_pairs();
        pairs.extend([
            (H_KIND, KIND_DELIVERY.to_owned()),
            (H_REASON, reason.as_str().to_owned()),
            (H_DETAIL, detail.to_owned()),
            (H_DEAD_AT, Utc::now().to_rfc3339()),
        ]);
        let key = task.build_id.to_string();
        let topic = &self.dlq_topic;
        match self
            .produce(topic, key.as_bytes(), &task.body, headers(pairs), abandon)
            .await?
        {
            Ok(()) => {
                self.metrics.dead_letter(reason.as_str());
                Ok(Landed::AsIs)
            }
            Err((refusal, error)) => {
                let detail = format!(
                    "dead letter ({}: {detail}) refused: {error}",
                    reason.as_str()
                );
                self.reference(task, hook, refusal, &detail, abandon).await
            }
        }
    }

    /// Dead-letters a record that could not be processed, keeping its original bytes.
    pub(crate) async fn dead_letter_record(
        &self,
        msg: &OwnedMessage,
        reason: DeadLetterReason,
        detail: &str,
        abandon: &CancellationToken,
    ) -> Result<Landed, Abandoned> {
        use rdkafka::Message;
        let source = Source::of(msg);
        let mut pairs = vec![
            (H_KIND, KIND_RECORD.to_owned()),
            (H_REASON, reason.as_str().to_owned()),
            (H_DETAIL, detail.to_owned()),
            (H_DEAD_AT, Utc::now().to_rfc3339()),
        ];
        pairs.extend(source.header_pairs());
        let (key, value) = (
            msg.key().unwrap_or_default(),
            msg.payload().unwrap_or_default(),
        );
        match self
            .produce(&self.dlq_topic, key, value, headers(pairs), abandon)
            .await?
        {
            Ok(()) => {
                self.metrics.dead_letter(reason.as_str());
                Ok(Landed::AsIs)
            }
            Err((refusal, error)) => {
                let mut pairs = vec![
                    (H_KIND, KIND_REFERENCE.to_owned()),
                    (H_REASON, refusal.reason().as_str().to_owned()),
                    (
                        H_DETAIL,
                        format!(
                            "dead letter ({}: {detail}) refused: {error}",
                            reason.as_str()
                        ),
                    ),
                    (H_DEAD_AT, Utc::now().to_rfc3339()),
                    (H_BODY_BYTES, value.len().to_string()),
                    (H_BODY_SHA256, sha256_hex(value)),
                ];
                pairs.extend(source.header_pairs());
                self.write_reference(key, pairs, refusal, abandon, || {
                    format!(
                        "record {}/{}@{}",
                        source.topic, source.partition, source.offset
                    )
                })
                .await
            }
        }
    }

    /// The compact dead letter of a delivery Kafka would not take as it is.
    async fn reference(
        &self,
        task: &DeliveryTask,
        hook: Option<&Hook>,
        refusal: Refusal,
        detail: &str,
        abandon: &CancellationToken,
    ) -> Result<Landed, Abandoned> {
        let mut pairs = task.header_pairs();
        pairs.extend([
            (H_KIND, KIND_REFERENCE.to_owned()),
            (H_REASON, refusal.reason().as_str().to_owned()),
            (H_DETAIL, detail.to_owned()),
            (H_DEAD_AT, Utc::now().to_rfc3339()),
            (H_BODY_BYTES, task.body.len().to_string()),
            (H_BODY_SHA256, sha256_hex(&task.body)),
        ]);
        if let Some(hook) = hook {
            pairs.push((
                H_IDEMPOTENCY_KEY,
                crate::deliver::idempotency_key(task.event_id, hook),
            ));
        }
        let key = task.build_id.to_string();
        self.write_reference(key.as_bytes(), pairs, refusal, abandon, || {
            format!(
                "delivery of event {} to hook {} (build {}, source {:?})",
                task.event_id, task.hook_id, task.build_id, task.source
            )
        })
        .await
    }

    async fn write_reference(
        &self,
        key: &[u8],
        pairs: Vec<(&'static str, String)>,
        refusal: Refusal,
        abandon: &CancellationToken,
        what: impl Fn() -> String,
    ) -> Result<Landed, Abandoned> {
        let reason = refusal.reason();
        warn!(what = %what(), reason = reason.as_str(), "Kafka refused a hand-off for good; writing a compact dead letter");
        match self
            .produce(&self.dlq_topic, key, &[], headers(pairs), abandon)
            .await?
        {
            Ok(()) => {
                self.metrics.dead_letter(reason.as_str());
                Ok(Landed::AsReference(reason))
            }
            Err((_, error)) => {
                self.metrics.handoff_lost();
                error!(what = %what(), %error, "Kafka refused the compact dead letter too: this delivery is lost");
                Ok(Landed::Lost)
            }
        }
    }
}

/// The key and headers of `task`'s record on the retry topic, due at `due` (its value is the
/// body). Key = build id, like the event it came from.
pub(crate) fn retry_record(task: &DeliveryTask, due: DateTime<Utc>) -> (Vec<u8>, OwnedHeaders) {
    let mut pairs = task.header_pairs();
    pairs.push((H_DUE_AT, due.timestamp_millis().to_string()));
    (task.build_id.to_string().into_bytes(), headers(pairs))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError;

    use super::*;

    #[test]
    fn known_reasons_are_every_reason_but_the_decoders() {
        // An exhaustive match: a new variant fails to compile here until it is placed.
        let known = |r: DeadLetterReason| match r {
            DeadLetterReason::Undecodable(_) => false,
            DeadLetterReason::BuildNotFound
            | DeadLetterReason::BadRetryRecord
            | DeadLetterReason::HookDisabled
            | DeadLetterReason::HookRemoved
            | DeadLetterReason::RetriesExhausted
            | DeadLetterReason::FinalResponse
            | DeadLetterReason::Gone
            | DeadLetterReason::HandoffTooLarge
            | DeadLetterReason::HandoffRefused => true,
        };
        assert!(DeadLetterReason::KNOWN.into_iter().all(known));
        let names: std::collections::HashSet<&str> =
            DeadLetterReason::KNOWN.map(|r| r.as_str()).into();
        assert_eq!(names.len(), 9, "{names:?}");
    }

    #[test]
    fn size_and_permission_errors_are_permanent_and_outages_are_not() {
        let produce = |code| KafkaError::MessageProduction(code);
        use RDKafkaErrorCode as C;
        assert_eq!(
            classify(&produce(C::MessageSizeTooLarge)),
            Some(Refusal::TooLarge)
        );
        for code in [
            C::InvalidRecord,
            C::TopicAuthorizationFailed,
            C::UnknownTopicOrPartition,
            C::UnknownTopic,
        ] {
            assert_eq!(classify(&produce(code)), Some(Refusal::Refused), "{code:?}");
        }
        for code in [
            C::MessageTimedOut,
            C::BrokerNotAvailable,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::RequestTimedOut,
            C::AllBrokersDown,
            C::NotEnoughReplicas,
            C::QueueFull,
        ] {
            assert_eq!(classify(&produce(code)), None, "{code:?}");
        }
        assert_eq!(classify(&KafkaError::Canceled), None);
    }

    #[test]
    fn reasons_keep_their_wire_names() {
        assert_eq!(
            DeadLetterReason::Undecodable("bad_magic").as_str(),
            "bad_magic"
        );
        assert_eq!(
            DeadLetterReason::HandoffTooLarge.as_str(),
            "handoff_too_large"
        );
        assert_eq!(DeadLetterReason::Gone.as_str(), "gone");
    }

    #[test]
    fn sha256_is_hex_of_the_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
