//! One step of a delivery task, the same on the main and the retry path: check the hook's
//! health, make one HTTP attempt, and settle what follows (success, retry hand-off, dead letter),
//! recording the hook's health on the way. Every hand-off waits for the broker's ack before the
//! step counts as finished: only then may the offset of the record that carried it be stored.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use hookline_cistate::{CiStore, Hook, HookFailure};
use hookline_schemas::Codec;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::ConsumerConfig;
use crate::deliver::{AttemptOutcome, Deliverer, DeliveryRequest};
use crate::handoff::{DeadLetterReason, Handoff, Landed};
use crate::hooks::{Gate, HookRegistry, gate};
use crate::metrics::{ConsumerMetrics, Outcome};
use crate::task::DeliveryTask;

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

pub use crate::shutdown::Abandoned;

/// Everything both paths share.
pub struct Pipeline {
    pub config: ConsumerConfig,
    pub store: Arc<dyn CiStore>,
    pub codec: Codec,
    pub hooks: HookRegistry,
    pub deliverer: Arc<dyn Attempt>,
    pub handoff: Handoff,
    pub metrics: Arc<ConsumerMetrics>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Makes the next attempt of `task` to `hook` (or defers or dead-letters it when the hook
    /// may not be called) and settles the result.
    pub(crate) async fn run_task(
        &self,
        task: DeliveryTask,
        hook: &Hook,
        abandon: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let now = Utc::now();
        match gate(hook, now) {
            Gate::Call => {}
            Gate::DeferUntil(until) => {
                debug!(hook_id = hook.id, event_id = %task.event_id, %until, "hook backing off; delivery deferred");
                let landed = self.handoff.to_retry(&task, hook, until, abandon).await?;
                self.settled(landed, Outcome::Deferred);
                return Ok(());
            }
            Gate::Disabled => {
                let landed = self
                    .handoff
                    .dead_letter_delivery(
                        &task,
                        Some(hook),
                        DeadLetterReason::HookDisabled,
                        "the hook is disabled",
                        abandon,
                    )
                    .await?;
                self.settled(landed, Outcome::HookDisabled);
                return Ok(());
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
                Ok(())
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
                        let landed = self.handoff.to_retry(&next, hook, due, abandon).await?;
                        if landed == Landed::AsIs {
                            self.metrics.retry_scheduled();
                        }
                        self.settled(landed, Outcome::Retried);
                    }
                    None => {
                        warn!(%event_id, build_id, hook_id, ?status, attempt, %reason, "retries exhausted; dead-lettered");
                        let landed = self
                            .handoff
                            .dead_letter_delivery(
                                &next,
                                Some(hook),
                                DeadLetterReason::RetriesExhausted,
                                &reason,
                                abandon,
                            )
                            .await?;
                        self.settled(landed, Outcome::Exhausted);
                    }
                }
                Ok(())
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
                let why = if disable_hook {
                    DeadLetterReason::Gone
                } else {
                    DeadLetterReason::FinalResponse
                };
                let landed = self
                    .handoff
                    .dead_letter_delivery(&next, Some(hook), why, &reason, abandon)
                    .await?;
                self.settled(landed, Outcome::Final);
                Ok(())
            }
        }
    }

    /// Counts how a task ended: as intended, or as a hand-off Kafka refused for good.
    fn settled(&self, landed: Landed, intended: Outcome) {
        self.metrics.delivery(match landed {
            Landed::AsIs => intended,
            Landed::AsReference(_) | Landed::Lost => Outcome::HandoffRefused,
        });
    }

    /// GitLab's auto-disable bookkeeping; a store failure here must not stop the delivery's own
    /// hand-off, so it is logged.
    async fn note_failure(&self, hook: &Hook) {
        let now = Utc::now();
        match self.hooks.failed(hook, now).await {
            Ok(HookFailure::Counted(updated)) => {
                let was_executable = gate(hook, now) == Gate::Call;
                if gate(&updated, now) != Gate::Call && was_executable {
                    self.metrics.hook_disabled();
                    warn!(hook_id = hook.id, failures = updated.recent_failures, disabled_until = ?updated.disabled_until, "hook disabled after repeated failures");
                }
            }
            Ok(HookFailure::NotExecutable(current)) => {
                debug!(hook_id = hook.id, failures = current.recent_failures, disabled_until = ?current.disabled_until, "failure not counted: the hook was already disabled when it ended");
            }
            Ok(HookFailure::Gone) => {}
            Err(error) => warn!(hook_id = hook.id, %error, "could not record the hook's failure"),
        }
    }
}
