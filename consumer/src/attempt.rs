//! One step of a delivery task, the same on the main and the retry path: check the hook's
//! health, make one HTTP attempt, and settle what follows (success, retry hand-off, dead letter),
//! recording the hook's health on the way. Every hand-off waits for the broker's ack before the
//! step counts as finished: only then may the offset of the record that carried it be stored.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use hookline_cistate::{CiStore, Hook};
use hookline_schemas::Codec;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::ConsumerConfig;
use crate::deliver::{AttemptOutcome, Deliverer, DeliveryRequest};
use crate::hooks::{Gate, HookRegistry, gate};
use crate::metrics::{ConsumerMetrics, Outcome};
use crate::task::DeliveryTask;
use crate::{dead_letter, retry};

/// The HTTP stage as the pipeline uses it; [`Deliverer`] is the real one.
#[async_trait]
pub trait Attempt: Send + Sync + std::fmt::Debug + 'static {
    async fn attempt(&self, request: &DeliveryRequest<'_>) -> AttemptOutcome;
}

#[async_trait]
impl Attempt for Deliverer {
    async fn attempt(&self, request: &DeliveryRequest<'_>) -> AttemptOutcome {
        Deliverer::attempt(self, request).await
    }
}

/// Shutdown's drain bound ran out: the work was dropped unfinished, so its offset must not be
/// stored (whoever owns the partition next does it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

/// Where a task ended up after one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEnd {
    Delivered,
    /// Handed to the retry topic (acked) for a later attempt.
    RetryScheduled,
    /// The hook is backing off: handed to the retry topic for when it may be called again.
    Deferred,
    /// Written to the dead-letter topic (acked).
    DeadLettered,
}

/// Everything both paths share.
pub struct Pipeline {
    pub config: ConsumerConfig,
    pub store: Arc<dyn CiStore>,
    pub codec: Codec,
    pub hooks: HookRegistry,
    pub deliverer: Arc<dyn Attempt>,
    pub producer: FutureProducer,
    pub metrics: Arc<ConsumerMetrics>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Back-off between tries of a hand-off or a store read that failed.
pub(crate) fn backoff(try_number: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << try_number.min(7)))
}

/// Sleeps `d`, or returns `Err(Abandoned)` if `abandon` fires first.
pub(crate) async fn pause(d: Duration, abandon: &CancellationToken) -> Result<(), Abandoned> {
    tokio::select! {
        _ = abandon.cancelled() => Err(Abandoned),
        _ = tokio::time::sleep(d) => Ok(()),
    }
}

impl Pipeline {
    /// Writes a record and waits for the broker's ack, trying again until it is acked: losing a
    /// retry or a dead letter would lose a delivery.
    pub(crate) async fn produce_acked(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: OwnedHeaders,
        abandon: &CancellationToken,
    ) -> Result<(), Abandoned> {
        for try_number in 0.. {
            let record = FutureRecord::to(topic)
                .key(key)
                .payload(value)
                .headers(headers.clone());
            let sent = tokio::select! {
                _ = abandon.cancelled() => return Err(Abandoned),
                sent = self.producer.send(record, Timeout::After(Duration::from_secs(30))) => sent,
            };
            match sent {
                Ok(_) => return Ok(()),
                Err((error, _)) => {
                    warn!(topic, %error, try_number, "hand-off not acked; trying again");
                    pause(backoff(try_number), abandon).await?;
                }
            }
        }
        unreachable!("the loop only ends by returning")
    }

    /// Makes the next attempt of `task` to `hook` (or defers or dead-letters it when the hook
    /// may not be called) and settles the result.
    pub(crate) async fn run_task(
        &self,
        task: DeliveryTask,
        hook: &Hook,
        abandon: &CancellationToken,
    ) -> Result<TaskEnd, Abandoned> {
        let now = Utc::now();
        match gate(hook, now) {
            Gate::Call => {}
            Gate::DeferUntil(until) => {
                debug!(hook_id = hook.id, event_id = %task.event_id, %until, "hook backing off; delivery deferred");
                retry::hand_off(self, &task, until, abandon).await?;
                self.metrics.delivery(Outcome::Deferred);
                return Ok(TaskEnd::Deferred);
            }
            Gate::Disabled => {
                dead_letter::delivery(
                    self,
                    &task,
                    "hook_disabled",
                    "the hook is disabled",
                    abandon,
                )
                .await?;
                self.metrics.delivery(Outcome::HookDisabled);
                return Ok(TaskEnd::DeadLettered);
            }
        }
        let attempt = task.attempts + 1;
        let request = DeliveryRequest {
            hook,
            event_id: task.event_id,
            body: task.body.clone(),
            attempt,
        };
        let outcome = tokio::select! {
            _ = abandon.cancelled() => return Err(Abandoned),
            outcome = self.deliverer.attempt(&request) => outcome,
        };
        let (event_id, build_id, hook_id) = (task.event_id, task.build_id, hook.id);
        match outcome {
            AttemptOutcome::Delivered { status, latency } => {
                self.metrics.delivery(Outcome::Delivered);
                self.metrics.attempt_took(latency);
                let since_event = (Utc::now() - task.occurred_at).to_std().unwrap_or_default();
                self.metrics.delivered_after(since_event);
                debug!(%event_id, build_id, hook_id, status, attempt, "delivered");
                if let Err(error) = self.hooks.succeeded(hook).await {
                    warn!(hook_id, %error, "could not record the hook's success");
                }
                Ok(TaskEnd::Delivered)
            }
            AttemptOutcome::Retry {
                status,
                retry_after,
                reason,
            } => {
                self.note_failure(hook).await;
                let next = DeliveryTask {
                    attempts: attempt,
                    last_error: Some(reason.clone()),
                    ..task
                };
                let delay =
                    self.config
                        .retry_schedule
                        .next_delay(attempt, retry_after, &mut rand::rng());
                match delay {
                    Some(delay) => {
                        info!(%event_id, build_id, hook_id, ?status, attempt, %reason, ?delay, "delivery failed; retry scheduled");
                        let due = Utc::now()
                            + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
                        retry::hand_off(self, &next, due, abandon).await?;
                        self.metrics.delivery(Outcome::Retried);
                        self.metrics.retry_scheduled();
                        Ok(TaskEnd::RetryScheduled)
                    }
                    None => {
                        warn!(%event_id, build_id, hook_id, ?status, attempt, %reason, "retries exhausted; dead-lettered");
                        dead_letter::delivery(self, &next, "retries_exhausted", &reason, abandon)
                            .await?;
                        self.metrics.delivery(Outcome::Exhausted);
                        Ok(TaskEnd::DeadLettered)
                    }
                }
            }
            AttemptOutcome::Final {
                status,
                reason,
                disable_hook,
            } => {
                warn!(%event_id, build_id, hook_id, ?status, attempt, %reason, disable_hook, "delivery failed for good; dead-lettered");
                self.note_failure(hook).await;
                if disable_hook {
                    match self.hooks.disable(hook).await {
                        Ok(()) => self.metrics.hook_disabled(),
                        Err(error) => warn!(hook_id, %error, "could not disable the hook"),
                    }
                }
                let next = DeliveryTask {
                    attempts: attempt,
                    last_error: Some(reason.clone()),
                    ..task
                };
                let kind = if disable_hook {
                    "gone"
                } else {
                    "final_response"
                };
                dead_letter::delivery(self, &next, kind, &reason, abandon).await?;
                self.metrics.delivery(Outcome::Final);
                Ok(TaskEnd::DeadLettered)
            }
        }
    }

    /// GitLab's auto-disable bookkeeping; a store failure here must not stop the delivery's own
    /// hand-off, so it is logged.
    async fn note_failure(&self, hook: &Hook) {
        match self.hooks.failed(hook, Utc::now()).await {
            Ok(Some(updated))
                if updated.disabled_until.is_some()
                    || gate(&updated, Utc::now()) == Gate::Disabled =>
            {
                self.metrics.hook_disabled();
                warn!(hook_id = hook.id, failures = updated.recent_failures, disabled_until = ?updated.disabled_until, "hook disabled after repeated failures");
            }
            Ok(_) => {}
            Err(error) => warn!(hook_id = hook.id, %error, "could not record the hook's failure"),
        }
    }
}
