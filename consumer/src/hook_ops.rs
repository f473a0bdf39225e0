//! An operator's hook operations, shared by the CLI (`hooks test`, `hooks resend`) and the
//! hooks API's routes:
//!
//! - [`test()`]: a Job Hook for the project's most recent build (or, without one, the sample
//!   build of `hookline_cistate::fixtures` moved into the project) sent now, through the same
//!   [`Deliverer`] and SSRF guard as every delivery, logged with the trigger `test`, answered
//!   with the receiver's status, headers and body (GitLab's "Test" button). A success
//!   re-enables a disabled hook, as in GitLab. Throttled as GitLab throttles it: at most
//!   [`TESTS_PER_MINUTE`] tests a minute per hook (a bucket shared by every instance), and each
//!   test takes a token of the namespace's rate limit like any delivery; past either, nothing is
//!   sent and the caller is told when to try again ([`HookOpError::Throttled`], HTTP 429).
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
use crate::rate_limit::RateLimitConfig;
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
    // Throttled: try again after `retry_after` (HTTP 429).
    #[error("{reason}; try again in {}s", retry_after.as_secs().max(1))]
    Throttled {
        reason: String,
        retry_after: Duration,
    },
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

/// GitLab's limit on a hook's tests (`web_hook_test` in its application rate limiter).
pub const TESTS_PER_MINUTE: u32 = 5;

/// A hook's test bucket: [`TESTS_PER_MINUTE`], all of them at once when the hook was not
/// tested for a minute.
pub fn test_bucket() -> hookline_cistate::Bucket {
    hookline_cistate::Bucket::per_minute(TESTS_PER_MINUTE, Duration::from_secs(60))
}

/// What the operations need: the store (its pool holds the log), the HTTP stage, a producer of
/// the consumer's cluster and its retry topic, and the rate limits tests count against. Cheap to
/// clone.
#[derive(Clone)]
pub struct HookOps {
    pub store: Arc<dyn CiStore>,
    pub deliverer: Deliverer,
    pub producer: HandoffProducer,
    pub retry_topic: String,
    /// The default namespace limit tests count against (`serve --rate-limit-per-minute`).
    pub rate_limit: RateLimitConfig,
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
            rate_limit: RateLimitConfig::default(),
            store,
            deliverer,
            producer,
            retry_topic,
        }
    }

    /// Tests count against `config`'s namespace limit (`serve --rate-limit-per-minute`); without
    /// it, only against the namespaces' own limits (`rate-limits set`).
    pub fn with_rate_limit(mut self, config: RateLimitConfig) -> HookOps {
        self.rate_limit = config;
        self
    }

    /// [`test_limited`] with these parts.
    pub async fn test(&self, hook_id: i64) -> Result<TestOutcome, HookOpError> {
        test_limited(
            self.store.as_ref(),
            &self.deliverer,
            self.rate_limit,
            hook_id,
        )
        .await
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

/// The bucket of the project's root namespace under `config` and the namespaces' own limits
/// (read fresh: tests are rare); `None` when it is not limited.
async fn namespace_bucket(
    store: &dyn CiStore,
    config: RateLimitConfig,
    project_id: i64,
) -> Result<Option<(i64, hookline_cistate::Bucket)>, HookOpError> {
    let Some(namespace) = store.project_namespace(project_id).await? else {
        return Ok(None);
    };
    let per_minute = store
        .rate_limit_overrides()
        .await?
        .into_iter()
        .find(|o| o.namespace_id == namespace)
        .map_or(config.per_minute, |o| o.per_minute);
    Ok(per_minute.map(|n| {
        (
            namespace,
            hookline_cistate::Bucket::per_minute(n, config.burst),
        )
    }))
}

/// Takes the tokens a test needs (the hook's test bucket, then the namespace's), or says how
/// long to wait.
async fn admit_test(
    store: &dyn CiStore,
    rate_limit: RateLimitConfig,
    hook_id: i64,
    project_id: i64,
) -> Result<(), HookOpError> {
    let wait = store.take_hook_test_token(hook_id, test_bucket()).await?;
    if !wait.is_zero() {
        return Err(HookOpError::Throttled {
            reason: format!(
                "hook {hook_id} was tested {TESTS_PER_MINUTE} times within a minute (GitLab's limit)"
            ),
            retry_after: wait,
        });
    }
    if let Some((namespace, bucket)) = namespace_bucket(store, rate_limit, project_id).await? {
        let wait = store.try_take_rate_token(namespace, bucket).await?;
        if !wait.is_zero() {
            let per_minute =
                (Duration::from_secs(60).as_secs_f64() / bucket.interval.as_secs_f64()).round();
            return Err(HookOpError::Throttled {
                reason: format!(
                    "the project's namespace is over its rate limit ({per_minute} deliveries a minute); a test counts as a delivery"
                ),
                retry_after: wait,
            });
        }
    }
    Ok(())
}

/// [`test_limited`] under the namespaces' own limits only (the CLI's `hooks test`: the default
/// limit is `serve`'s option).
pub async fn test(
    store: &dyn CiStore,
    deliverer: &Deliverer,
    hook_id: i64,
) -> Result<TestOutcome, HookOpError> {
    test_limited(store, deliverer, RateLimitConfig::default(), hook_id).await
}

/// Sends hook `hook_id` a Job Hook now and returns the receiver's answer (see the module docs);
/// `rate_limit` is the default namespace limit the test counts against.
pub async fn test_limited(
    store: &dyn CiStore,
    deliverer: &Deliverer,
    rate_limit: RateLimitConfig,
    hook_id: i64,
) -> Result<TestOutcome, HookOpError> {
    let hook = store
        .hook(hook_id)
        .await?
        .ok_or(HookOpError::NoHook(hook_id))?;
    admit_test(store, rate_limit, hook_id, hook.project_id).await?;
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
