//! What a retry checks again before it is sent: whether the build's user was blocked since the
//! event was first consumed.
//!
//! GitLab sends no hooks for builds of blocked users, and its worker decides it each time it
//! loads the build. hookline's main path decides it when it renders from current state
//! (`resolve`); a retry carries its body and would be sent as it is, so here the retry path reads
//! the user again. A retry whose build's user is blocked now is dropped as the main path skips
//! such an event: counted (`retries_dropped_total{reason="user_blocked"}`), logged, finished,
//! not dead-lettered (nothing is owed to a blocked user's receivers, and a replay would only be
//! dropped again). This holds whatever the payload timing: the block came after the first
//! attempt. A build gone from the store is not a reason to drop: the retry has its body.

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::context::Context;
use crate::metrics::Stall;
use crate::order::Ordering;
use crate::shutdown::{Abandoned, wait_out};
use crate::task::DeliveryTask;

/// Drops `task` if its build's user is blocked now: true when it was dropped (and its place in
/// an order queue, if it had one, settled so the build's later events do not wait for it).
pub(crate) async fn drop_if_user_blocked(
    cx: &Context,
    task: &DeliveryTask,
    abandon: &CancellationToken,
) -> Result<bool, Abandoned> {
    let snapshot = wait_out(
        &cx.metrics,
        Stall::Store,
        "store unavailable; the retry's build cannot be read",
        abandon,
        || cx.store.snapshot(task.build_id),
    )
    .await?;
    if !snapshot.is_some_and(|s| s.user.blocked) {
        return Ok(false);
    }
    cx.metrics.retry_dropped("user_blocked");
    info!(event_id = %task.event_id, build_id = task.build_id, hook_id = task.hook_id, attempts = task.attempts, "the build's user was blocked meanwhile; retry dropped");
    if cx.config.ordering != Ordering::Relaxed {
        // Settling moves the queue on: the build's next parked delivery goes back to the retry
        // topic (and is dropped in turn when it comes due, its user being blocked).
        crate::strict::settle_entry(cx, task.hook_id, task.build_id, task.event_id, abandon)
            .await?;
    }
    Ok(true)
}
