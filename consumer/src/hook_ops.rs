//! An operator's hook operations, shared by the CLI (`hooks test`, `hooks resend`) and the
//! hooks API's routes:
//!
//! - [`test()`]: a Job Hook for the project's most recent build (or, without one, the sample
//!   build of `hookline_cistate::fixtures` moved into the project) sent now, through the same
//!   [`Deliverer`] and SSRF guard as every delivery, logged with the trigger `test`, answered
//!   with the receiver's status, headers and body (GitLab's "Test" button). A success
//!   re-enables a disabled hook, as in GitLab.
//! - [`resend`]: one logged delivery re-driven through the retry topic, due now, with its own
//!   event id (so the same `Idempotency-Key`), as `dlq replay` does; the retry path logs its
//!   attempts with the trigger `resend`. Refused when the log kept no body (over
//!   [`crate::deliver::REQUEST_BODY_LIMIT`]).
//!
//! [`HookOps`] holds what both need, as `hookline-consumer serve` has it
//! ([`crate::Consumer::hook_ops`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use hookline_cistate::delivery_log::{self, DeliveryLogEntry, LogTrigger};
use hookline_cistate::fixtures::sample;
use hookline_cistate::{CiStore, StoreError, Transition, render};
use hookline_schemas::{BuildStatus, TransitionFacts};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use tracing::{info, warn};
use uuid::Uuid;

use crate::config::ConsumerConfig;
use crate::deliver::{AttemptOutcome, Deliverer, DeliveryRequest, idempotency_key, sha256_hex};
use crate::handoff::retry_record;
use crate::kafka::{HandoffProducer, producer_config};
use crate::task::DeliveryTask;

/// Why an operation was not done, grouped by what the caller does.
#[derive(Debug, thiserror::Error)]
pub enum HookOpError {
    // Not found (HTTP 404).
    #[error("no hook {0}")]
    NoHook(i64),
    #[error("no delivery log entry {0}")]
    NoEntry(i64),
    // Refused: asking again will not help (HTTP 422).
    #[error(
        "delivery log entry {log_id} kept no request body ({size} bytes; bodies over {limit} bytes keep only their SHA-256): it cannot be resent"
    )]
    BodyNotKept {
        log_id: i64,
        size: i32,
        limit: usize,
    },
    #[error("delivery log entry {0}'s request body does not match its SHA-256: it is not resent")]
    BodyMismatch(i64),
    #[error("the delivery log needs a PostgreSQL store")]
    NoLog,
    // Unavailable: try again later (HTTP 503).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("retry topic: {0}")]
    Kafka(#[from] KafkaError),
}

/// What a test delivery came to: the receiver's answer, and its log entry.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    /// The receiver's status; `None` when no answer came (`outcome` says why).
    pub status: Option<u16>,
    /// The answer's first 8 KB.
    pub body: Option<String>,
    /// The answer's first 50 headers, each value cut at 1 KB.
    pub headers: Option<serde_json::Value>,
    pub duration: Duration,
    /// What the attempt came to, as a delivery's would (`Final` for a URL the guard refuses).
    pub outcome: AttemptOutcome,
    /// The project has no build: the sample build was sent.
    pub synthetic: bool,
    /// The entry as logged; its `id` is 0 when it could not be written (no PostgreSQL store,
    /// or the database failed: the test's answer counts more than its row).
    pub entry: DeliveryLogEntry,
}

/// A logged delivery handed back to the retry path.
#[derive(Debug, Clone, PartialEq)]
pub struct Resent {
    pub log_id: i64,
    pub hook_id: i64,
    pub event_id: Uuid,
    pub idempotency_key: String,
}

/// What the operations need: the store (its pool holds the log), the HTTP stage, a producer of
/// the consumer's cluster and its retry topic. Cheap to clone.
#[derive(Clone)]
pub struct HookOps {
    pub store: Arc<dyn CiStore>,
    pub deliverer: Deliverer,
    pub producer: HandoffProducer,
    pub retry_topic: String,
}

impl std::fmt::Debug for HookOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookOps")
            .field("retry_topic", &self.retry_topic)
            .finish_non_exhaustive()
    }
}

impl HookOps {
    pub fn new(
        store: Arc<dyn CiStore>,
        deliverer: Deliverer,
        producer: HandoffProducer,
        retry_topic: String,
    ) -> HookOps {
        HookOps {
            store,
            deliverer,
            producer,
            retry_topic,
        }
    }

    /// [`test()`] with these parts.
    pub async fn test(&self, hook_id: i64) -> Result<TestOutcome, HookOpError> {
        test(self.store.as_ref(), &self.deliverer, hook_id).await
    }

    /// [`resend`] with these parts.
    pub async fn resend(&self, hook_id: Option<i64>, log_id: i64) -> Result<Resent, HookOpError> {
        resend(
            self.store.as_ref(),
            &self.producer,
            &self.retry_topic,
            hook_id,
            log_id,
        )
        .await
    }
}

/// Sends hook `hook_id` a Job Hook now and returns the receiver's answer (see the module docs).
pub async fn test(
    store: &dyn CiStore,
    deliverer: &Deliverer,
    hook_id: i64,
) -> Result<TestOutcome, HookOpError> {
    let hook = store
        .hook(hook_id)
        .await?
        .ok_or(HookOpError::NoHook(hook_id))?;
    let latest = match store.latest_build(hook.project_id).await? {
        Some(build_id) => store.snapshot(build_id).await?,
        None => None,
    };
    let synthetic = latest.is_none();
    let snapshot = latest.unwrap_or_else(|| {
        let mut s = sample(0);
        s.project.id = hook.project_id;
        s.build.project_id = hook.project_id;
        s.pipeline.project_id = hook.project_id;
        s
    });
    // A build in a status that sends no hook (manual, skipped) is shown as a success.
    let transition = Transition::of_current(&snapshot.build).unwrap_or(Transition {
        status: BuildStatus::Success,
        facts: TransitionFacts::default(),
    });
    let body = Bytes::from(render(&snapshot, &transition));
    let request = DeliveryRequest {
        hook: &hook,
        event_id: Uuid::new_v4(),
        body,
        attempt: 1,
    };
    let (outcome, exchange) = deliverer.attempt_captured(&request).await;
    let build_id = (!synthetic).then_some(snapshot.build.id);
    let mut entry = exchange.log_entry(&request, build_id, LogTrigger::Test, &outcome);
    if let Some(pool) = store.pg_pool() {
        match delivery_log::insert(pool, &entry).await {
            Ok(id) => entry.id = id,
            Err(error) => warn!(hook_id, %error, "could not log the hook's test"),
        }
    }
    if let AttemptOutcome::Delivered { .. } = outcome
        && let Err(error) = store.record_hook_success(hook_id).await
    {
        warn!(hook_id, %error, "could not record the test's success");
    }
    info!(
        hook_id,
        status = exchange.response_status,
        synthetic,
        outcome = outcome.label(),
        "hook tested"
    );
    Ok(TestOutcome {
        status: exchange.response_status,
        body: exchange.response_body,
        headers: exchange.response_headers,
        duration: exchange.duration,
        outcome,
        synthetic,
        entry,
    })
}

/// Hands delivery-log entry `log_id` (of hook `hook_id`, when given) to the retry topic, due
/// now, with its event id and body (see the module docs).
pub async fn resend(
    store: &dyn CiStore,
    producer: &HandoffProducer,
    retry_topic: &str,
    hook_id: Option<i64>,
    log_id: i64,
) -> Result<Resent, HookOpError> {
    let pool = store.pg_pool().ok_or(HookOpError::NoLog)?;
    let entry = match hook_id {
        Some(hook_id) => delivery_log::get(pool, hook_id, log_id).await?,
        None => delivery_log::find(pool, log_id).await?,
    }
    .ok_or(HookOpError::NoEntry(log_id))?;
    let hook = store
        .hook(entry.hook_id)
        .await?
        .ok_or(HookOpError::NoHook(entry.hook_id))?;
    let Some(body) = entry.request_body else {
        return Err(HookOpError::BodyNotKept {
            log_id,
            size: entry.request_body_size,
            limit: crate::deliver::REQUEST_BODY_LIMIT,
        });
    };
    if sha256_hex(body.as_bytes()) != entry.request_body_sha256 {
        return Err(HookOpError::BodyMismatch(log_id));
    }
    let task = DeliveryTask {
        event_id: entry.event_id,
        build_id: entry.build_id.unwrap_or(0),
        project_id: entry.project_id,
        hook_id: hook.id,
        attempts: 0,
        occurred_at: entry.attempted_at,
        body: Bytes::from(body),
        last_error: None,
        source: None,
        // Outside the build's order, as a dead-letter replay is.
        replayed: true,
        resend: true,
        rate_token_for: None,
    };
    let (key, headers) = retry_record(&task, Utc::now());
    producer
        .send(
            FutureRecord::to(retry_topic)
                .key(&key)
                .payload(task.body.as_ref())
                .headers(headers),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .map_err(|(e, _)| HookOpError::Kafka(e))?;
    let key = idempotency_key(task.event_id, &hook);
    info!(log_id, hook_id = hook.id, event_id = %task.event_id, idempotency_key = %key, "logged delivery resent");
    Ok(Resent {
        log_id,
        hook_id: hook.id,
        event_id: task.event_id,
        idempotency_key: key,
    })
}

/// [`resend`] for a command-line run: a producer of `config`'s cluster, to its retry topic.
pub async fn resend_with_config(
    config: &ConsumerConfig,
    store: &dyn CiStore,
    hook_id: Option<i64>,
    log_id: i64,
) -> Result<Resent, HookOpError> {
    let producer: HandoffProducer =
        producer_config(config).create_with_context(Default::default())?;
    resend(store, &producer, &config.retry_topic, hook_id, log_id).await
}
