//! One step of a delivery task, the same on the main and the retry path: check the hook's
//! health and the root namespace's rate limit, make one HTTP attempt, and settle what follows. What follows is decided by a pure
//! function, [`decide`], from the attempt's outcome and the retry schedule: a [`Settlement`]
//! (delivered, retry at a due time, deferred, or a dead letter with its reason). The step then
//! carries it out: every hand-off waits for the broker's ack before the step counts as finished,
//! since only then may the offset of the record that carried the task be stored.

use chrono::{DateTime, Utc};
use hookline_cistate::delivery_log::LogTrigger;
use hookline_cistate::{Hook, HookFailure};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::deliver::{AttemptOutcome, DeliveryRequest};
use crate::handoff::{DeadLetterReason, Landed};
use crate::hooks::{Gate, gate};
use crate::metrics::Outcome;
use crate::rate_limit::Admission;
use crate::schedule::RetrySchedule;
use crate::shutdown::Abandoned;
use crate::task::DeliveryTask;

/// A successful answer at least this slow is counted per hook (`slow_answers`): a receiver
/// that never fails but takes its time holds its hook's slots, and shows there.
pub const SLOW_ANSWER: std::time::Duration = std::time::Duration::from_secs(1);

/// What follows an attempt (or a hook that may not be called).
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// 2xx: done.
    Delivered,
    /// Failed, worth another attempt at `due`.
    Retry { due: DateTime<Utc>, reason: String },
    /// The hook is backing off: not attempted, handed to the retry topic for `until`.
    Deferred { until: DateTime<Utc> },
    /// Done for good: dead-lettered with this reason.
    DeadLetter {
        reason: DeadLetterReason,
        detail: String,
    },
}

impl Settlement {
    /// The `outcome` label a settlement is counted under when its hand-off lands as asked.
    fn outcome(&self) -> Outcome {
        match self {
            Settlement::Delivered => Outcome::Delivered,
            Settlement::Retry { .. } => Outcome::Retried,
            Settlement::Deferred { .. } => Outcome::Deferred,
            Settlement::DeadLetter { reason, .. } => match reason {
                DeadLetterReason::HookDisabled => Outcome::HookDisabled,
                DeadLetterReason::HookRemoved => Outcome::HookRemoved,
                DeadLetterReason::RetriesExhausted => Outcome::Exhausted,
                _ => Outcome::Final,
            },
        }
    }
}

/// Whether a delivery is attempted now, or handed on without an attempt because its hook has
/// no slot for it soon (see `fair`): deferred to the retry topic until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Attempt,
    HandOn { until: DateTime<Utc> },
}

/// What a hook's health says before an attempt: `None` to call it now.
pub fn before_attempt(hook: &Hook, now: DateTime<Utc>) -> Option<Settlement> {
    match gate(hook, now) {
        Gate::Call => None,
        Gate::DeferUntil(until) => Some(Settlement::Deferred { until }),
        Gate::Disabled => Some(Settlement::DeadLetter {
            reason: DeadLetterReason::HookDisabled,
            detail: "the hook is disabled".into(),
        }),
    }
}

/// What follows attempt number `attempt` (1-based) that ended with `outcome` at `now`.
pub fn decide(
    outcome: &AttemptOutcome,
    attempt: u32,
    schedule: &RetrySchedule,
    rng: &mut impl Rng,
    now: DateTime<Utc>,
) -> Settlement {
    match outcome {
        AttemptOutcome::Delivered { .. } => Settlement::Delivered,
        AttemptOutcome::Retry {
            retry_after,
            reason,
            ..
        } => match schedule.next_delay(attempt, *retry_after, rng) {
            Some(delay) => Settlement::Retry {
                due: now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX),
                reason: reason.clone(),
            },
            None => Settlement::DeadLetter {
                reason: DeadLetterReason::RetriesExhausted,
                detail: reason.clone(),
            },
        },
        AttemptOutcome::Final {
            reason,
            disable_hook,
            ..
        } => Settlement::DeadLetter {
            reason: if *disable_hook {
                DeadLetterReason::Gone
            } else {
                DeadLetterReason::FinalResponse
            },
            detail: reason.clone(),
        },
    }
}

/// Makes the next attempt of `task` to `hook` (or defers or dead-letters it when the hook may
/// not be called) and carries out what follows.
pub(crate) async fn run(
    cx: &Context,
    task: DeliveryTask,
    hook: &Hook,
    mode: Mode,
    abandon: &CancellationToken,
) -> Result<(), Abandoned> {
    let (task, settlement) = attempt(cx, task, hook, mode, abandon).await?;
    settle(cx, task, Some(hook), settlement, abandon)
        .await
        .map(drop)
}

/// Makes the next attempt of `task` to `hook` (or not, when the hook may not be called) and
/// decides what follows, without carrying it out: the task as it should be handed on, and its
/// settlement.
pub(crate) async fn attempt(
    cx: &Context,
    task: DeliveryTask,
    hook: &Hook,
    mode: Mode,
    abandon: &CancellationToken,
) -> Result<(DeliveryTask, Settlement), Abandoned> {
    if let Some(settlement) = before_attempt(hook, Utc::now()) {
        if let Settlement::Deferred { until } = &settlement {
            cx.metrics.defer("hook_backoff");
            debug!(hook_id = hook.id, event_id = %task.event_id, %until, "hook backing off; delivery deferred");
        }
        return Ok((task, settlement));
    }
    // After the hook's health (a disabled hook is dead-lettered, not handed on), before the
    // rate limit (a hand-on spends no token).
    if let Mode::HandOn { until } = mode {
        cx.metrics.defer("hook_busy");
        debug!(hook_id = hook.id, event_id = %task.event_id, %until, "hook busy; delivery handed on");
        return Ok((task, Settlement::Deferred { until }));
    }
    let attempt = task.attempts + 1;
    // After the hook's health, so a backing-off hook spends no token.
    if let Admission::DeferUntil(until) = cx.rate_limits.admit(&cx.metrics, &task, abandon).await? {
        cx.metrics.defer("rate_limit");
        debug!(hook_id = hook.id, project_id = task.project_id, event_id = %task.event_id, %until, "namespace over its rate limit; delivery deferred");
        let task = DeliveryTask {
            rate_token_for: Some(attempt),
            ..task
        };
        return Ok((task, Settlement::Deferred { until }));
    }
    let request = DeliveryRequest {
        hook,
        event_id: task.event_id,
        body: task.body.clone(),
        attempt,
    };
    let trigger = if task.resend {
        LogTrigger::Resend
    } else {
        LogTrigger::Delivery
    };
    let attempted = async {
        if !cx.log.is_on() {
            return cx.deliverer.attempt(&request).await;
        }
        let (outcome, exchange) = cx.deliverer.attempt_captured(&request).await;
        cx.log
            .record(exchange.log_entry(&request, Some(task.build_id), trigger, &outcome));
        outcome
    };
    let outcome = tokio::select! {
        _ = abandon.cancelled() => return Err(Abandoned),
        outcome = attempted => outcome,
    };
    let settlement = decide(
        &outcome,
        attempt,
        &cx.config.retry_schedule,
        &mut rand::rng(),
        Utc::now(),
    );
    let (event_id, build_id, hook_id) = (task.event_id, task.build_id, hook.id);
    match &outcome {
        AttemptOutcome::Delivered { status, latency } => {
            cx.metrics.attempt_took(*latency);
            if *latency >= SLOW_ANSWER {
                cx.metrics.slow_answer(hook.id);
            }
            let since_event = (Utc::now() - task.occurred_at).to_std().unwrap_or_default();
            cx.metrics.delivered_after(since_event);
            debug!(%event_id, build_id, hook_id, status, attempt, "delivered");
            if let Err(error) = cx.hooks.succeeded(hook).await {
                warn!(hook_id, %error, "could not record the hook's success");
            }
        }
        AttemptOutcome::Retry { status, reason, .. } => {
            // Logged once, with what follows.
            match &settlement {
                Settlement::Retry { due, .. } => {
                    info!(%event_id, build_id, hook_id, ?status, attempt, %reason, %due, "delivery failed; retry scheduled")
                }
                _ => {
                    warn!(%event_id, build_id, hook_id, ?status, attempt, %reason, "retries exhausted; dead-lettered")
                }
            }
            note_failure(cx, hook).await;
        }
        AttemptOutcome::Final {
            status,
            reason,
            disable_hook,
        } => {
            warn!(%event_id, build_id, hook_id, ?status, attempt, %reason, disable_hook, "delivery failed for good; dead-lettered");
            note_failure(cx, hook).await;
            if *disable_hook {
                match cx.hooks.disable(hook).await {
                    Ok(()) => cx.metrics.hook_disabled(),
                    Err(error) => warn!(hook_id, %error, "could not disable the hook"),
                }
            }
        }
    }
    let task = match &outcome {
        AttemptOutcome::Delivered { .. } => task,
        AttemptOutcome::Retry { reason, .. } | AttemptOutcome::Final { reason, .. } => {
            DeliveryTask {
                attempts: attempt,
                last_error: Some(reason.clone()),
                // Spent on this attempt; the next one takes its own.
                rate_token_for: None,
                ..task
            }
        }
    };
    Ok((task, settlement))
}

/// Carries out a settlement: the hand-off it needs (acked), and its count. `hook` is `None`
/// when the hook is gone (removed before a retry). Returns where the hand-off landed.
pub(crate) async fn settle(
    cx: &Context,
    task: DeliveryTask,
    hook: Option<&Hook>,
    settlement: Settlement,
    abandon: &CancellationToken,
) -> Result<Landed, Abandoned> {
    let landed = match &settlement {
        Settlement::Delivered => Landed::AsIs,
        Settlement::Retry { due, .. } => {
            let landed = cx.handoff.to_retry(&task, hook, *due, abandon).await?;
            if landed == Landed::AsIs {
                cx.metrics.retry_scheduled();
            }
            landed
        }
        Settlement::Deferred { until } => cx.handoff.to_retry(&task, hook, *until, abandon).await?,
        Settlement::DeadLetter { reason, detail } => {
            cx.handoff
                .dead_letter_delivery(&task, hook, *reason, detail, abandon)
                .await?
        }
    };
    cx.metrics.delivery(match landed {
        Landed::AsIs => settlement.outcome(),
        Landed::AsReference(_) | Landed::Lost => Outcome::HandoffRefused,
    });
    Ok(landed)
}

/// GitLab's auto-disable bookkeeping; a store failure here must not stop the delivery's own
/// hand-off, so it is logged.
async fn note_failure(cx: &Context, hook: &Hook) {
    let now = Utc::now();
    match cx.hooks.failed(hook, now).await {
        Ok(HookFailure::Counted(updated)) => {
            if gate(hook, now) == Gate::Call && gate(&updated, now) != Gate::Call {
                cx.metrics.hook_disabled();
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::TimeZone;
    use rand::SeedableRng;

    use super::*;

    fn schedule() -> RetrySchedule {
        RetrySchedule {
            jitter: 0.0,
            ..RetrySchedule::with_delays(vec![Duration::from_secs(5), Duration::from_secs(300)])
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
    }

    fn retry(retry_after: Option<Duration>) -> AttemptOutcome {
        AttemptOutcome::Retry {
            status: Some(503),
            retry_after,
            reason: "HTTP 503".into(),
        }
    }

    #[test]
    fn a_retryable_failure_is_retried_on_the_schedule_then_dead_lettered() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let s = schedule();
        assert_eq!(
            decide(&retry(None), 1, &s, &mut rng, now()),
            Settlement::Retry {
                due: now() + chrono::Duration::seconds(5),
                reason: "HTTP 503".into()
            }
        );
        assert_eq!(
            decide(&retry(None), 2, &s, &mut rng, now()),
            Settlement::Retry {
                due: now() + chrono::Duration::seconds(300),
                reason: "HTTP 503".into()
            }
        );
        assert_eq!(
            decide(&retry(None), 3, &s, &mut rng, now()),
            Settlement::DeadLetter {
                reason: DeadLetterReason::RetriesExhausted,
                detail: "HTTP 503".into()
            }
        );
    }

    #[test]
    fn retry_after_lengthens_the_wait() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let settled = decide(
            &retry(Some(Duration::from_secs(60))),
            1,
            &schedule(),
            &mut rng,
            now(),
        );
        assert_eq!(
            settled,
            Settlement::Retry {
                due: now() + chrono::Duration::seconds(60),
                reason: "HTTP 503".into()
            }
        );
    }

    #[test]
    fn final_answers_are_dead_lettered_and_410_says_gone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let final_ = |disable_hook| AttemptOutcome::Final {
            status: Some(if disable_hook { 410 } else { 401 }),
            reason: "no".into(),
            disable_hook,
        };
        let reason = |s: Settlement| match s {
            Settlement::DeadLetter { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason(decide(&final_(false), 1, &schedule(), &mut rng, now())),
            DeadLetterReason::FinalResponse
        );
        assert_eq!(
            reason(decide(&final_(true), 1, &schedule(), &mut rng, now())),
            DeadLetterReason::Gone
        );
    }

    #[test]
    fn a_backing_off_hook_defers_and_a_disabled_one_dead_letters() {
        let mut hook = hookline_cistate::Hook {
            id: 1,
            uuid: uuid::Uuid::nil(),
            project_id: 1,
            url: "https://example.com".into(),
            token: None,
            signing_secret: None,
            job_events: true,
            recent_failures: 4,
            disabled_until: Some(now() + chrono::Duration::minutes(1)),
            collapse: false,
            created_at: None,
        };
        assert_eq!(
            before_attempt(&hook, now()),
            Some(Settlement::Deferred {
                until: now() + chrono::Duration::minutes(1)
            })
        );
        assert_eq!(
            before_attempt(&hook, now() + chrono::Duration::minutes(1)),
            None
        );
        hook.recent_failures = 40;
        assert!(matches!(
            before_attempt(&hook, now()),
            Some(Settlement::DeadLetter {
                reason: DeadLetterReason::HookDisabled,
                ..
            })
        ));
    }
}
