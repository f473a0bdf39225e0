//! The [`Emitter`]: one transition in, one acknowledged `BuildEvent` out.
//!
//! ```text
//! TransitionRequest -> event id known? (same transition: first answer; other: conflict)
//!     -> snapshot (store) -> user blocked? -> within bounds? -> flag on for project?
//!     -> render inline? -> encode -> within --max-event-bytes? -> produce -> ack
//! ```
//!
//! Size: the CI state's free text is bounded ([`crate::bounds`]), so a rendered payload has a
//! known worst case; the encoded event is measured against `max_event_bytes` before it is
//! produced, and the same number (plus a record's framing) is librdkafka's `message.max.bytes`,
//! so an event is refused here, with a reason, before Kafka ever sees it. [`Emitter::check_topic_limit`]
//! checks at startup that the topic's `max.message.bytes` takes what librdkafka may send.
//!
//! Builds of blocked users send no hooks (as in GitLab): the emitter knows the snapshot for every
//! transition, inline or deferred, so it decides here and emits nothing for them
//! ([`Emission::Skipped`]). A user blocked after a deferred event was emitted is caught by the
//! consumer, which checks again when it renders from current state.
//!
//! Ordering: one build's events share a key (the build id), so Kafka keeps them in order within
//! its partition, and the idempotent producer keeps retries from reordering or duplicating them.
//! That holds for what the emitter enqueues in order: a batch enqueues its transitions in request
//! order; separate concurrent calls for the same build are ordered only if the caller waits for
//! one to be acknowledged before sending the next.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hookline_cistate::render::truncate_to_micros;
use hookline_cistate::{Build, CiStore, NoHook, RenderSnapshot, Transition};
use hookline_schemas::codec::REGISTRY_ATTEMPTS;
use hookline_schemas::{
    BuildEvent, BuildStatus, Codec, PayloadTiming, SchemaVersion, TransitionFacts,
};
use hookline_shell::kafka_log::KafkaLogContext;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use uuid::Uuid;

use crate::bounds;
use crate::error::{EmitError, ProducerError};
use crate::event_ids::{self, EventIds, Recorded};
use crate::flags::{Flags, INLINE_FLAG};
use crate::metrics::ProducerMetrics;
use crate::render;

pub use crate::bounds::DEFAULT_MAX_EVENT_BYTES;

/// How long a transition waits for Kafka's ack by default. With `acks=all`, a partition whose
/// in-sync replicas include a broker that just died takes no write until the controller fences
/// that broker (`broker.session.timeout.ms`, 9 s by default) and, when the dead broker was the
/// active controller, a new one is elected: about 11 s on a three-node cluster. 30 s outlasts
/// that with room, so a broker lost for good costs callers latency, not refusals.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// What a record adds around the encoded event when librdkafka sizes a request: the key (a
/// build id, at most 20 digits), the record's and the batch's framing. librdkafka's
/// `message.max.bytes` is the event bound plus this, so an event within the bound is never
/// refused by librdkafka for its size.
pub const RECORD_OVERHEAD: usize = 512;

/// librdkafka settings the emitter sets itself, after the pass-through options, and refuses
/// among them: a `202` means the event is on every in-sync replica, written once.
pub const FIXED_KAFKA_SETTINGS: &[(&str, &str)] = &[
    (
        "enable.idempotence",
        "a retried produce must not duplicate or reorder events",
    ),
    (
        "acks",
        "an event is acknowledged once every in-sync replica has it",
    ),
    (
        "request.required.acks",
        "an event is acknowledged once every in-sync replica has it",
    ),
];

/// How the emitter reaches Kafka.
#[derive(Debug, Clone)]
pub struct EmitterConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// The events topic.
    pub topic: String,
    /// librdkafka settings applied after hookline's own (TLS, SASL, batching...).
    pub kafka: Vec<(String, String)>,
    /// The Avro version written; `V1` acts as a legacy producer: no payload, never renders.
    pub writer: SchemaVersion,
    /// Create the topic with this many partitions when missing (skipped when unsupported).
    pub create_topic_partitions: Option<i32>,
    /// Longest wait for Kafka's acknowledgement before the transition is refused. librdkafka
    /// keeps the record for half as long again ([`EmitterConfig::kafka_message_timeout`]), so an
    /// ack that comes after the refusal is seen and counted.
    pub delivery_timeout: Duration,
    /// Base URL of a Confluent-compatible schema registry, where the writer schema is registered
    /// at startup. `None`: the embedded registry (ids fixed in `schemas/avro/manifest.json`).
    pub schema_registry_url: Option<String>,
    /// Largest encoded event; larger ones are refused before producing. librdkafka's
    /// `message.max.bytes` is this plus [`RECORD_OVERHEAD`].
    pub max_event_bytes: usize,
    /// Where the ids of recent events are kept; `None` checks no id for reuse.
    pub event_ids: Option<Arc<dyn EventIds>>,
}

impl EmitterConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topic: "build-events".to_owned(),
            kafka: Vec::new(),
            writer: SchemaVersion::LATEST,
            create_topic_partitions: None,
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
            schema_registry_url: None,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            event_ids: None,
        }
    }

    /// librdkafka's `message.timeout.ms`: the delivery timeout and half as much again. A request
    /// is answered once the delivery timeout is over; the record may still be in flight (the
    /// broker may have appended it and its answer not have arrived), and an ack that comes in the
    /// extra half is counted (`hookline_producer_late_acks_total`) and its event id recorded, so
    /// the client's retry with the same `event_id` is answered from the first write.
    pub fn kafka_message_timeout(&self) -> Duration {
        self.delivery_timeout + self.delivery_timeout / 2
    }

    /// librdkafka's `message.max.bytes` for this configuration.
    pub fn message_max_bytes(&self) -> usize {
        self.max_event_bytes + RECORD_OVERHEAD
    }

    fn admin(&self) -> Result<AdminClient<KafkaLogContext>, KafkaError> {
        self.client_config()
            .create_with_context(KafkaLogContext::default())
    }

    fn client_config(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.kafka {
            client.set(key, value);
        }
        client
    }

    /// Refuses pass-through options that would change what an acknowledgement means
    /// ([`FIXED_KAFKA_SETTINGS`]) or the size bound (`--max-event-bytes`).
    pub fn check_kafka_options(&self) -> Result<(), ProducerError> {
        if let Some((key, _)) = self.kafka.iter().find(|(k, _)| k == "message.max.bytes") {
            return Err(ProducerError::Invalid(format!(
                "--kafka-option {key}=... is set by --max-event-bytes; use that instead"
            )));
        }
        hookline_shell::refuse_fixed_kafka_options(&self.kafka, FIXED_KAFKA_SETTINGS)
            .map_err(ProducerError::Invalid)
    }

    fn producer_config(&self) -> ClientConfig {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &self.brokers)
            .set("compression.type", "zstd")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                self.kafka_message_timeout().as_millis().max(1).to_string(),
            );
        for (key, value) in &self.kafka {
            client.set(key, value);
        }
        // After the free-form options, so none of them can weaken what a 202 promises (they are
        // refused beforehand too: `check_kafka_options`). Idempotence: broker-side dedup of
        // retries, order kept per partition; acks=all: every in-sync replica has the event.
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // The size bound is one setting, --max-event-bytes.
            .set("message.max.bytes", self.message_max_bytes().to_string());
        client
    }
}

/// The codec writing `writer`: the embedded registry's without a URL; with one, the writer schema
/// is registered with that Confluent-compatible registry (its id goes in every record), asking a
/// registry that does not answer a few times before startup fails.
pub async fn writer_codec(
    registry_url: Option<&str>,
    writer: SchemaVersion,
) -> Result<Codec, ProducerError> {
    let codec = Codec::for_registry(registry_url, writer)
        .await
        .map_err(|e| registry_error(registry_url.unwrap_or_default(), writer, e))?;
    if let Some(url) = registry_url {
        tracing::info!(%url, schema_id = codec.writer_schema_id(), ?writer, "writer schema registered");
    }
    Ok(codec)
}

fn registry_error(
    url: &str,
    writer: SchemaVersion,
    e: hookline_schemas::CodecError,
) -> ProducerError {
    use hookline_schemas::{CodecError, RegistryError};
    if let CodecError::Registry(RegistryError::InvalidUrl(_)) = e {
        return ProducerError::Invalid(e.to_string());
    }
    if e.is_transient() {
        ProducerError::SchemaRegistry(format!(
            "cannot register the {writer:?} writer schema at {url} (gave up after {REGISTRY_ATTEMPTS} attempts): {e}"
        ))
    } else {
        ProducerError::SchemaRegistry(format!("{url} refused the {writer:?} writer schema: {e}"))
    }
}

/// One transition to emit.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionRequest {
    pub build_id: i64,
    /// The status the build reached.
    pub status: BuildStatus,
    /// When it happened; now when `None`.
    pub occurred_at: Option<DateTime<Utc>>,
    /// The facts at the transition; `None` reads them from the build row, which the CI system
    /// has already committed.
    pub facts: Option<TransitionFacts>,
    /// The event's identity; a new UUID when `None`. Pass the same id when retrying a request
    /// whose answer was lost, so downstream idempotency keys stay the same.
    pub event_id: Option<Uuid>,
}

impl TransitionRequest {
    pub fn new(build_id: i64, status: BuildStatus) -> Self {
        Self {
            build_id,
            status,
            occurred_at: None,
            facts: None,
            event_id: None,
        }
    }

    /// The digest an event id is recorded with: what the caller sent, before defaults.
    pub fn digest(&self) -> [u8; 32] {
        event_ids::digest(
            self.build_id,
            self.status,
            self.occurred_at,
            self.facts.as_ref(),
        )
    }
}

/// An event Kafka acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub event_id: Uuid,
    pub timing: PayloadTiming,
    pub partition: i32,
    pub offset: i64,
    /// Time spent rendering inline; `None` for deferred events.
    pub render_time: Option<Duration>,
    /// Size of the embedded payload (0 for deferred events).
    pub payload_bytes: usize,
    /// The event id was known with the same transition: this is its first emission, and
    /// nothing new was emitted.
    pub repeated: bool,
}

impl Emitted {
    /// What the event id store keeps of this emission.
    fn recorded(&self, digest: [u8; 32]) -> Recorded {
        Recorded {
            event_id: self.event_id,
            digest,
            partition: self.partition,
            offset: self.offset,
            timing: self.timing,
            payload_bytes: self.payload_bytes,
        }
    }

    /// The answer to a retry: the first emission, nothing new emitted.
    pub fn repeat_of(first: &Recorded) -> Self {
        Emitted {
            event_id: first.event_id,
            timing: first.timing,
            partition: first.partition,
            offset: first.offset,
            render_time: None,
            payload_bytes: first.payload_bytes,
            repeated: true,
        }
    }
}

/// What became of a transition that was not refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Emission {
    /// Kafka acknowledged its event (or, for a known event id, did so before).
    Emitted(Emitted),
    /// It sends no hook by design (GitLab's rule, `hookline_cistate::no_hook`): nothing was
    /// emitted and there is nothing to retry.
    Skipped { build_id: i64, reason: NoHook },
}

impl Emission {
    /// The acknowledged event, unless the transition was skipped.
    pub fn emitted(self) -> Option<Emitted> {
        match self {
            Emission::Emitted(emitted) => Some(emitted),
            Emission::Skipped { .. } => None,
        }
    }
}

/// Emits transitions to Kafka. Cheap to clone; clones share one producer.
#[derive(Clone)]
pub struct Emitter {
    inner: Arc<Inner>,
}

struct Inner {
    producer: FutureProducer<KafkaLogContext>,
    topic: String,
    codec: Codec,
    store: Arc<dyn CiStore>,
    flags: Flags,
    metrics: Arc<ProducerMetrics>,
    delivery_timeout: Duration,
    max_event_bytes: usize,
    event_ids: Option<Arc<dyn EventIds>>,
    /// Kept for the admin client of [`Emitter::check_topic_limit`].
    config: EmitterConfig,
}

impl fmt::Debug for Emitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emitter")
            .field("topic", &self.inner.topic)
            .field("writer", &self.inner.codec.writer_version())
            .finish_non_exhaustive()
    }
}

impl Emitter {
    /// Creates the producer (and the topic, when configured). Does not wait for the brokers:
    /// readiness ([`Emitter::check_ready`]) says when they answer.
    pub async fn new(
        config: EmitterConfig,
        store: Arc<dyn CiStore>,
        flags: Flags,
        metrics: Arc<ProducerMetrics>,
    ) -> Result<Self, ProducerError> {
        if config.topic.is_empty() {
            return Err(ProducerError::Invalid("the topic name is empty".into()));
        }
        config.check_kafka_options()?;
        let codec = writer_codec(config.schema_registry_url.as_deref(), config.writer).await?;
        let producer: FutureProducer<KafkaLogContext> = config
            .producer_config()
            .create_with_context(KafkaLogContext::default())
            .map_err(|e| ProducerError::Kafka(format!("creating the producer: {e}")))?;
        if let Some(partitions) = config.create_topic_partitions {
            ensure_topic(&config, partitions).await;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                producer,
                topic: config.topic.clone(),
                codec,
                store,
                flags,
                metrics,
                delivery_timeout: config.delivery_timeout,
                max_event_bytes: config.max_event_bytes,
                event_ids: config.event_ids.clone(),
                config,
            }),
        })
    }

    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    pub fn flags(&self) -> &Flags {
        &self.inner.flags
    }

    pub fn metrics(&self) -> &Arc<ProducerMetrics> {
        &self.inner.metrics
    }

    pub fn store(&self) -> &Arc<dyn CiStore> {
        &self.inner.store
    }

    /// Evaluates the flag for the build's project, renders inline if it is on, produces, and
    /// returns once Kafka acknowledged the event. With an event id store, a known `event_id`
    /// is answered from it: the first emission for the same transition, a conflict otherwise.
    pub async fn emit(&self, request: TransitionRequest) -> Result<Emission, EmitError> {
        let arrived = Instant::now();
        let digest = request.digest();
        if let Some(id) = request.event_id
            && let Some(known) = self.known_ids(&[id]).await?.remove(&id)
        {
            return self.repeated(&known, digest);
        }
        let snapshot = match self.inner.store.snapshot(request.build_id).await {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => return Err(self.failed(EmitError::UnknownBuild(request.build_id))),
            Err(e) => {
                return Err(self.failed(EmitError::Unavailable(format!("CI state store: {e}"))));
            }
        };
        let emission = self.emit_with(&snapshot, request, arrived).await?;
        if let Emission::Emitted(emitted) = &emission {
            self.record_ids(&[emitted.recorded(digest)]).await;
        }
        Ok(emission)
    }

    /// The records of the ids that are known (none without an event id store).
    async fn known_ids(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Recorded>, EmitError> {
        match &self.inner.event_ids {
            Some(store) if !ids.is_empty() => store
                .lookup(ids)
                .await
                .map_err(|e| self.failed(EmitError::Unavailable(e))),
            _ => Ok(HashMap::new()),
        }
    }

    /// The answer to a request whose event id is known.
    fn repeated(&self, known: &Recorded, digest: [u8; 32]) -> Result<Emission, EmitError> {
        if known.digest == digest {
            tracing::debug!(event_id = %known.event_id, "event id known with the same transition: answered from its first emission");
            Ok(Emission::Emitted(Emitted::repeat_of(known)))
        } else {
            Err(self.failed(EmitError::Conflict(known.event_id)))
        }
    }

    /// Records emitted ids. A failure is logged, not returned: the events are acknowledged, and
    /// a client retrying them would only emit them again (as before ids were recorded).
    async fn record_ids(&self, records: &[Recorded]) {
        if let Some(store) = &self.inner.event_ids
            && !records.is_empty()
            && let Err(error) = store.record(records).await
        {
            tracing::warn!(%error, events = records.len(), "emitted event ids not recorded; a reuse of them is not detected");
        }
    }

    /// Emits many transitions, loading their snapshots in one query. Results are in request
    /// order; transitions are enqueued in request order, so one build's events stay ordered.
    pub async fn emit_batch(
        &self,
        requests: Vec<TransitionRequest>,
    ) -> Vec<Result<Emission, EmitError>> {
        let arrived = Instant::now();
        let digests: Vec<[u8; 32]> = requests.iter().map(TransitionRequest::digest).collect();
        let named: Vec<Uuid> = requests.iter().filter_map(|r| r.event_id).collect();
        let mut known = match self.known_ids(&named).await {
            Ok(known) => known,
            Err(error) => {
                let reason = match error {
                    EmitError::Unavailable(reason) => reason,
                    other => other.to_string(),
                };
                return requests
                    .iter()
                    .map(|_| Err(EmitError::Unavailable(reason.clone())))
                    .collect();
            }
        };
        // An id named twice in one batch: the first item defines it, as if it came first.
        let mut decided: Vec<Option<Result<Emission, EmitError>>> = Vec::new();
        for (request, digest) in requests.iter().zip(&digests) {
            let answer = match request.event_id {
                Some(id) => match known.get(&id) {
                    Some(record) => Some(self.repeated(record, *digest)),
                    None => {
                        known.insert(
                            id,
                            Recorded {
                                event_id: id,
                                digest: *digest,
                                partition: -1,
                                offset: -1,
                                timing: PayloadTiming::Deferred,
                                payload_bytes: 0,
                            },
                        );
                        None
                    }
                },
                None => None,
            };
            decided.push(match answer {
                // Same id and content as an earlier item of this batch: emit it again, as the
                // earlier one has no partition and offset yet; the content is the same.
                Some(Ok(Emission::Emitted(first))) if first.partition < 0 => None,
                other => other,
            });
        }
        let results = self.emit_undecided(requests, decided, arrived).await;
        let records: Vec<Recorded> = results
            .iter()
            .zip(&digests)
            .filter_map(|(result, digest)| match result {
                Ok(Emission::Emitted(emitted)) if !emitted.repeated => {
                    Some(emitted.recorded(*digest))
                }
                _ => None,
            })
            .collect();
        self.record_ids(&records).await;
        results
    }

    /// Emits the requests whose answer is not `decided` yet, in request order.
    async fn emit_undecided(
        &self,
        requests: Vec<TransitionRequest>,
        decided: Vec<Option<Result<Emission, EmitError>>>,
        arrived: Instant,
    ) -> Vec<Result<Emission, EmitError>> {
        let mut ids: Vec<i64> = requests
            .iter()
            .zip(&decided)
            .filter(|(_, d)| d.is_none())
            .map(|(r, _)| r.build_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let snapshots: HashMap<i64, RenderSnapshot> = match self.inner.store.snapshots(&ids).await {
            Ok(snapshots) => snapshots,
            Err(e) => {
                let reason = format!("CI state store: {e}");
                return requests
                    .iter()
                    .map(|_| Err(self.failed(EmitError::Unavailable(reason.clone()))))
                    .collect();
            }
        };
        // join_all polls in order, and each future enqueues to librdkafka on its first poll
        // (nothing is awaited before the send), so the enqueue order is the request order.
        futures::future::join_all(requests.into_iter().zip(decided).map(|(request, decided)| {
            let snapshot = snapshots.get(&request.build_id);
            async move {
                if let Some(answer) = decided {
                    return answer;
                }
                match snapshot {
                    Some(snapshot) => self.emit_with(snapshot, request, arrived).await,
                    None => Err(self.failed(EmitError::UnknownBuild(request.build_id))),
                }
            }
        }))
        .await
    }

    fn failed(&self, error: EmitError) -> EmitError {
        self.inner.metrics.produce_error(error.kind());
        error
    }

    /// The event for `request`: flag evaluated, payload rendered when inline.
    fn prepare(
        &self,
        snapshot: &RenderSnapshot,
        request: TransitionRequest,
    ) -> (BuildEvent, Option<Duration>) {
        let build = &snapshot.build;
        // A legacy (v1) producer cannot carry a payload, so it never pays for a render.
        let inline = self.inner.codec.writer_version() >= SchemaVersion::V2 && {
            let on = self.inner.flags.inline_for_project(build.project_id);
            self.inner.metrics.flag_evaluated(INLINE_FLAG, on);
            on
        };
        let facts = pin_precision(request.facts.unwrap_or_else(|| facts_of(build)));
        let transition = Transition {
            status: request.status,
            facts,
        };
        let (payload, render_time) = if inline {
            let rendered = render::inline(snapshot, &transition);
            self.inner
                .metrics
                .rendered(rendered.took, rendered.payload.len());
            (Some(rendered.payload), Some(rendered.took))
        } else {
            (None, None)
        };
        let event = BuildEvent {
            event_id: request.event_id.unwrap_or_else(Uuid::new_v4),
            build_id: build.id,
            project_id: build.project_id,
            pipeline_id: build.pipeline_id,
            status: transition.status,
            occurred_at: truncate_to_micros(request.occurred_at.unwrap_or_else(Utc::now)),
            facts: transition.facts,
            payload_timing: if payload.is_some() {
                PayloadTiming::Inline
            } else {
                PayloadTiming::Deferred
            },
            payload,
        };
        (event, render_time)
    }

    async fn emit_with(
        &self,
        snapshot: &RenderSnapshot,
        request: TransitionRequest,
        arrived: Instant,
    ) -> Result<Emission, EmitError> {
        if let Some(reason) = hookline_cistate::no_hook(snapshot) {
            self.inner.metrics.skipped(reason.as_str());
            tracing::debug!(
                build_id = snapshot.build.id,
                status = %request.status,
                reason = reason.as_str(),
                "no event: GitLab sends no hook here ({reason})"
            );
            return Ok(Emission::Skipped {
                build_id: snapshot.build.id,
                reason,
            });
        }
        if let Err(over) = bounds::check(snapshot) {
            return Err(self.failed(EmitError::TooLarge(over.to_string())));
        }
        // Only a client that named the event id can retry with it: only then is a late ack's id
        // worth recording.
        let digest = request.event_id.map(|_| request.digest());
        let (event, render_time) = self.prepare(snapshot, request);
        let bytes = self.inner.codec.encode(&event).map_err(|e| {
            self.failed(EmitError::Rejected(format!(
                "encoding event {}: {e}",
                event.event_id
            )))
        })?;
        if bytes.len() > self.inner.max_event_bytes {
            let payload = event.payload.as_ref().map_or(0, Vec::len);
            return Err(self.failed(EmitError::TooLarge(format!(
                "the encoded event is {} bytes (its inline Job Hook {payload} bytes), over the maximum of {} (--max-event-bytes)",
                bytes.len(),
                self.inner.max_event_bytes
            ))));
        }
        let key = event.build_id.to_string();
        let record = FutureRecord::to(&self.inner.topic)
            .key(&key)
            .payload(&bytes);
        let deadline = tokio::time::Instant::now() + self.inner.delivery_timeout;
        let mut pending = match self.enqueue(record, deadline).await {
            Ok(pending) => pending,
            Err(error) => {
                tracing::warn!(build_id = event.build_id, event_id = %event.event_id, %error, "event not enqueued");
                return Err(self.failed(classify(&error)));
            }
        };
        let answer = match tokio::time::timeout_at(deadline, &mut pending).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_canceled)) => {
                return Err(self.failed(EmitError::Unavailable(
                    "kafka: the producer dropped the event unanswered".into(),
                )));
            }
            Err(_) => {
                self.watch_late_ack(pending, &event, digest, render_time);
                tracing::warn!(build_id = event.build_id, event_id = %event.event_id, timeout = ?self.inner.delivery_timeout, "event not acknowledged within the delivery timeout; it may still be written");
                return Err(self.failed(EmitError::Unavailable(format!(
                    "kafka did not acknowledge the event within {:?} (--delivery-timeout); it may still be written: retry with the same event_id",
                    self.inner.delivery_timeout
                ))));
            }
        };
        match answer {
            Ok(delivery) => {
                self.inner
                    .metrics
                    .emitted(event.payload_timing.as_str(), arrived.elapsed());
                tracing::debug!(
                    build_id = event.build_id,
                    event_id = %event.event_id,
                    status = %event.status,
                    timing = %event.payload_timing,
                    partition = delivery.partition,
                    offset = delivery.offset,
                    "event acknowledged"
                );
                Ok(Emission::Emitted(Emitted {
                    event_id: event.event_id,
                    timing: event.payload_timing,
                    partition: delivery.partition,
                    offset: delivery.offset,
                    render_time,
                    payload_bytes: event.payload.as_ref().map_or(0, Vec::len),
                    repeated: false,
                }))
            }
            Err((error, _)) => {
                tracing::warn!(build_id = event.build_id, event_id = %event.event_id, %error, "event not acknowledged");
                Err(self.failed(classify(&error)))
            }
        }
    }

    /// Hands `record` to librdkafka, waiting (until `deadline`) while its queue is full.
    async fn enqueue(
        &self,
        mut record: FutureRecord<'_, String, Vec<u8>>,
        deadline: tokio::time::Instant,
    ) -> Result<DeliveryFuture, KafkaError> {
        loop {
            match self.inner.producer.send_result(record) {
                Ok(pending) => return Ok(pending),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if tokio::time::Instant::now() < deadline =>
                {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// Follows an event whose request was answered before Kafka's ack (the delivery timeout
    /// ran out while it was in flight) until librdkafka gives it up for good. An ack that comes
    /// is counted (`hookline_producer_late_acks_total`): the client was told 503 and will send
    /// the transition again, so it may be written twice; recording its event id answers a
    /// retry that comes after this point from the first write instead.
    fn watch_late_ack(
        &self,
        pending: DeliveryFuture,
        event: &BuildEvent,
        digest: Option<[u8; 32]>,
        render_time: Option<Duration>,
    ) {
        let emitter = self.clone();
        let (event_id, build_id, timing) = (event.event_id, event.build_id, event.payload_timing);
        let payload_bytes = event.payload.as_ref().map_or(0, Vec::len);
        tokio::spawn(async move {
            match pending.await {
                Ok(Ok(delivery)) => {
                    emitter.inner.metrics.late_ack();
                    tracing::warn!(%event_id, build_id, partition = delivery.partition, offset = delivery.offset, "event acknowledged after its request was refused: written, and the client's retry may write it again (receivers de-duplicate by Idempotency-Key)");
                    if let Some(digest) = digest {
                        let emitted = Emitted {
                            event_id,
                            timing,
                            partition: delivery.partition,
                            offset: delivery.offset,
                            render_time,
                            payload_bytes,
                            repeated: false,
                        };
                        emitter.record_ids(&[emitted.recorded(digest)]).await;
                    }
                }
                Ok(Err((error, _))) => {
                    tracing::debug!(%event_id, build_id, %error, "event given up by librdkafka after its request was refused");
                }
                Err(_) => {}
            }
        });
    }

    /// Ready when the store answers and Kafka returns the topic's metadata.
    pub async fn check_ready(&self) -> Result<(), String> {
        self.inner
            .store
            .ping()
            .await
            .map_err(|e| format!("CI state store: {e}"))?;
        let producer = self.inner.producer.clone();
        let topic = self.inner.topic.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
                .map(|m| {
                    m.topics()
                        .iter()
                        .map(|t| (t.name().to_owned(), t.error()))
                        .collect::<Vec<_>>()
                })
        })
        .await
        .map_err(|e| format!("kafka metadata task: {e}"))?
        .map_err(|e| format!("kafka: {e}"))?;
        match metadata.iter().find(|(name, _)| *name == self.inner.topic) {
            Some((_, None)) => Ok(()),
            Some((_, Some(code))) => Err(format!("kafka: topic {}: {:?}", self.inner.topic, code)),
            None => Err(format!("kafka: topic {} not in metadata", self.inner.topic)),
        }
    }

    /// Checks that the topic takes the largest record librdkafka may send (`message.max.bytes`):
    /// an error naming both numbers when its `max.message.bytes` is lower. A cluster that does
    /// not answer the question (no admin API, no permission, topic not created yet) gets a
    /// warning: producing then shows what the broker takes.
    pub async fn check_topic_limit(&self) -> Result<(), ProducerError> {
        let config = &self.inner.config;
        let admin = match config.admin() {
            Ok(admin) => admin,
            Err(error) => {
                tracing::warn!(%error, "cannot create an admin client; topic size limit not checked");
                return Ok(());
            }
        };
        let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let topic = ResourceSpecifier::Topic(&config.topic);
        let answer = tokio::time::timeout(
            Duration::from_secs(15),
            admin.describe_configs([&topic], &options),
        )
        .await;
        let limit = match answer {
            Ok(Ok(results)) => results.into_iter().find_map(|result| {
                let resource = result.ok()?;
                resource
                    .get("max.message.bytes")
                    .and_then(|entry| entry.value.as_deref()?.parse::<usize>().ok())
            }),
            Ok(Err(error)) => {
                tracing::warn!(topic = %config.topic, %error, "topic size limit not checked");
                return Ok(());
            }
            Err(_) => {
                tracing::warn!(topic = %config.topic, "describing the topic timed out; size limit not checked");
                return Ok(());
            }
        };
        let needed = config.message_max_bytes();
        match limit {
            Some(limit) if limit < needed => Err(ProducerError::Invalid(format!(
                "topic {} takes records of at most {limit} bytes (max.message.bytes), but --max-event-bytes {} allows records of {needed} bytes: lower --max-event-bytes to {} or raise the topic's max.message.bytes",
                config.topic,
                config.max_event_bytes,
                limit.saturating_sub(RECORD_OVERHEAD)
            ))),
            Some(limit) => {
                tracing::info!(topic = %config.topic, max_message_bytes = limit, max_event_bytes = config.max_event_bytes, "topic takes the largest event");
                Ok(())
            }
            None => {
                tracing::warn!(topic = %config.topic, "topic's max.message.bytes unknown; size limit not checked");
                Ok(())
            }
        }
    }

    /// Waits up to `timeout` for every enqueued event to be acknowledged (or fail).
    pub async fn flush(&self, timeout: Duration) -> Result<(), ProducerError> {
        let producer = self.inner.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| ProducerError::Kafka(format!("flush task: {e}")))?
            .map_err(|e| ProducerError::Kafka(format!("flush: {e}")))
    }
}

/// The transition facts the build row holds now.
fn facts_of(build: &Build) -> TransitionFacts {
    TransitionFacts {
        started_at: build.started_at,
        finished_at: build.finished_at,
        duration: build.duration,
        queued_duration: build.queued_duration,
        failure_reason: build.failure_reason.clone(),
    }
}

/// The wire keeps microseconds: render with what the consumer will decode, so an inline payload
/// and a deferred render of the same event agree.
fn pin_precision(facts: TransitionFacts) -> TransitionFacts {
    TransitionFacts {
        started_at: facts.started_at.map(truncate_to_micros),
        finished_at: facts.finished_at.map(truncate_to_micros),
        ..facts
    }
}

/// Kafka's refusal of one event: too large (`TooLarge`), refused for good (`Refused`), or
/// anything else, which may pass later (`Unavailable`). Never an internal error: the event was
/// fine as far as hookline knows, and the caller needs to know whether to retry.
pub(crate) fn classify(error: &KafkaError) -> EmitError {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            EmitError::TooLarge(format!("kafka refused the event for its size: {error}"))
        }
        Some(
            RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidArgument
            | RDKafkaErrorCode::InvalidMessage,
        ) => EmitError::Refused(format!("kafka refused the event: {error}")),
        _ => EmitError::Unavailable(format!("kafka: {error}")),
    }
}

/// Creates the topic if it is missing. Best effort: a cluster without the admin API (the
/// librdkafka mock cluster) or without permission gets a warning, and producing then shows
/// whether the topic exists.
async fn ensure_topic(config: &EmitterConfig, partitions: i32) {
    let admin = match config.admin() {
        Ok(admin) => admin,
        Err(error) => {
            tracing::warn!(%error, "cannot create an admin client; topic creation skipped");
            return;
        }
    };
    // -1: the broker's default replication factor.
    let topic = NewTopic::new(&config.topic, partitions, TopicReplication::Fixed(-1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let outcome = tokio::time::timeout(
        Duration::from_secs(15),
        admin.create_topics([&topic], &options),
    )
    .await;
    match outcome {
        Ok(Ok(results)) => {
            for result in results {
                match result {
                    Ok(name) => tracing::info!(topic = %name, partitions, "topic created"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, code)) => {
                        tracing::warn!(topic = %name, ?code, "topic creation failed")
                    }
                }
            }
        }
        Ok(Err(error)) => tracing::warn!(topic = %config.topic, %error, "topic creation skipped"),
        Err(_) => tracing::warn!(topic = %config.topic, "topic creation timed out; skipped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hostile() -> EmitterConfig {
        let mut config = EmitterConfig::new("127.0.0.1:9");
        config.kafka = [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("request.required.acks", "0"),
            ("linger.ms", "20"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec();
        config
    }

    #[test]
    fn pass_through_options_cannot_weaken_what_an_acknowledgement_means() {
        let client = hostile().producer_config();
        assert_eq!(client.get("enable.idempotence"), Some("true"));
        assert_eq!(client.get("acks"), Some("all"));
        assert_eq!(client.get("request.required.acks"), Some("0"));
        // Other pass-through settings still win over hookline's defaults.
        assert_eq!(client.get("linger.ms"), Some("20"));
    }

    #[tokio::test]
    async fn the_emitter_refuses_options_it_sets_itself() {
        for (key, value) in [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("request.required.acks", "0"),
            ("message.max.bytes", "5000000"),
        ] {
            let mut config = EmitterConfig::new("127.0.0.1:9");
            config.kafka = vec![(key.to_owned(), value.to_owned())];
            let error = config.check_kafka_options().unwrap_err().to_string();
            assert!(error.contains(key), "{key}: {error}");
        }
        let error = Emitter::new(
            hostile(),
            Arc::new(hookline_cistate::MemoryStore::new()),
            Flags::in_memory(),
            Arc::new(ProducerMetrics::new()),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&error, ProducerError::Invalid(m) if m.contains("enable.idempotence=false")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn without_a_registry_url_the_embedded_ids_are_written() {
        let v2 = writer_codec(None, SchemaVersion::V2).await.unwrap();
        let v1 = writer_codec(None, SchemaVersion::V1).await.unwrap();
        assert_eq!((v1.writer_schema_id(), v2.writer_schema_id()), (1, 2));
    }

    #[tokio::test]
    async fn an_unreachable_registry_fails_startup_after_retries() {
        // Bind then drop a listener: nothing answers on that port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let error = writer_codec(Some(&url), SchemaVersion::V2)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProducerError::SchemaRegistry(m) if m.contains(&url) && m.contains("gave up after 5 attempts")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_registry_url_must_be_http() {
        let error = writer_codec(Some("registry:8081"), SchemaVersion::V2)
            .await
            .unwrap_err();
        assert!(matches!(error, ProducerError::Invalid(_)), "{error}");
    }
}
