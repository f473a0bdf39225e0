//! The retry path: failed deliveries wait on a retry topic, never on the main partition.
//!
//! # One retry topic with due times (not one topic per delay tier)
//!
//! Each retry record is a [`DeliveryTask`] (body + headers) stamped with the time it is due
//! (`hookline-due-at-ms`). Per-tier topics keep each topic in due order only while every record
//! of a tier waits the same time; here the wait is not fixed: jitter, a receiver's `Retry-After`
//! and a hook's back-off (`disabled_until`) all move it, and the schedule itself is configuration
//! (tests shrink it to milliseconds). With one topic the schedule can change without new topics,
//! and the mock cluster and real brokers need one topic, not seven.
//!
//! The cost of one topic is that a record due in ten hours must not hold the records behind it
//! nor the topic's offsets. So the retry worker holds a record in memory for at most
//! `retry_hold`: if it is due by then it is attempted; if not, it is written again at the end of
//! the retry topic (acked) and its offset is done. A long wait therefore re-circulates once per
//! hold period, offsets never lag by more than about a hold period, and a crash re-reads at most
//! that much. Memory is bounded by `max_in_flight` records held at once.

use chrono::{DateTime, TimeZone, Utc};
use rdkafka::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use hookline_cistate::Hook;

use crate::context::Context;
use crate::engine::Work;
use crate::handoff::DeadLetterReason;
use crate::metrics::Stall;
use crate::path::Path;
use crate::recheck;
use crate::shutdown::{Abandoned, pause, wait_out};
use crate::step::{self, Settlement};
use crate::strict;
use crate::task::{DeliveryTask, H_DUE_AT, header};

/// The retry path: due delivery tasks from the retry topic, until `shutdown` (or a fatal error
/// of its client, returned with the path). The engine's drain and the last commit are the
/// caller's.
pub(crate) async fn run(path: Path, shutdown: CancellationToken) -> (Path, Option<KafkaError>) {
    let mut intake = path.intake();
    while let Some(batch) = intake
        .next_batch(path.cx.config.poll_batch, &shutdown)
        .await
    {
        for (msg, ticket, permit) in batch {
            let claim = path.claim((ticket, permit), 1);
            let engine = path.engine.clone();
            // Waiting to be due takes no delivery slot; the attempt does (submitted then).
            path.engine.spawn(move |cx, abandon| async move {
                match process(&cx, &msg, &abandon).await {
                    Ok(Some((task, hook))) => engine.submit(Work::Retry { task, hook }, claim),
                    Ok(None) => claim.part_done(Ok(())),
                    Err(abandoned) => claim.part_done(Err(abandoned)),
                }
            });
        }
    }
    let fatal = intake.fatal();
    drop(intake);
    (path, fatal)
}

/// When a retry record is due (now if the header is missing or unreadable).
fn due_at(msg: &OwnedMessage) -> DateTime<Utc> {
    header(msg.headers(), H_DUE_AT)
        .and_then(|ms| ms.parse::<i64>().ok())
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .unwrap_or_else(Utc::now)
}

/// Handles one record of the retry topic up to its attempt: waits until it is due (at most
/// `retry_hold`), or puts it back at the end of the topic if it is not due by then. Returns the
/// task and its hook (read just now) when it is to be attempted; `None` when it is done without
/// an attempt.
async fn process(
    p: &Context,
    msg: &OwnedMessage,
    abandon: &CancellationToken,
) -> Result<Option<(DeliveryTask, Hook)>, Abandoned> {
    let task = match DeliveryTask::from_headers(msg.headers(), msg.payload().unwrap_or_default()) {
        Ok(task) => task,
        Err(detail) => {
            warn!(partition = msg.partition(), offset = msg.offset(), %detail, "unreadable retry record; dead-lettered");
            p.handoff
                .dead_letter_record(msg, DeadLetterReason::BadRetryRecord, &detail, abandon)
                .await?;
            return Ok(None);
        }
    };
    let due = due_at(msg);
    let hold = chrono::Duration::from_std(p.config.retry_hold).unwrap_or(chrono::Duration::MAX);
    let hold_until = Utc::now() + hold;
    let wake = due.min(hold_until);
    if let Ok(wait) = (wake - Utc::now()).to_std() {
        pause(wait, abandon).await?;
    }
    if Utc::now() < due {
        debug!(event_id = %task.event_id, hook_id = task.hook_id, %due, "not due yet; back to the end of the retry topic");
        p.handoff.to_retry(&task, None, due, abandon).await?;
        return Ok(None);
    }
    // A build's user blocked since the first attempt sends nothing more (see `recheck`).
    if recheck::drop_if_user_blocked(p, &task, abandon).await? {
        return Ok(None);
    }
    // Retries must see the hook's current health and settings: read it fresh.
    let hook = wait_out(
        &p.metrics,
        Stall::Store,
        "store unavailable; retry waits",
        abandon,
        || p.hooks.hook(task.hook_id),
    )
    .await?;
    let Some(hook) = hook else {
        warn!(event_id = %task.event_id, hook_id = task.hook_id, "hook removed before its retry; dead-lettered");
        let removed = Settlement::DeadLetter {
            reason: DeadLetterReason::HookRemoved,
            detail: "the hook no longer exists".into(),
        };
        let (hook_id, build_id, event_id) = (task.hook_id, task.build_id, task.event_id);
        step::settle(p, task, None, removed, abandon).await?;
        // Its place in an order queue, if it had one, goes with it (and the next in line is
        // written back, to be dead-lettered the same way).
        strict::settle_entry(p, hook_id, build_id, event_id, abandon).await?;
        return Ok(None);
    };
    Ok(Some((task, hook)))
}
